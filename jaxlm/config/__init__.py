"""Configuration: gin files and command-line flags parsed with one-line errors, and the
check that no binding goes unused."""
