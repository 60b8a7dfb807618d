"""The one exception type that means "the user asked for something we cannot do".

`python -m jaxlm.train` turns a UserError into one line on stderr and exit code 2, never a
traceback. Raise it with a message that says what is wrong *and* how to fix it.
"""


class UserError(Exception):
  """Bad input: a missing file, an unknown gin binding, an impossible setting."""


class TrainingDiverged(UserError):
  """Training produced non-finite values for too many consecutive steps."""
