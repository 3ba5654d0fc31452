"""The one exception type for bad user input; entry points print it as one line and exit 2."""


class UserError(Exception):
  """Bad input from the user (path, config value, shape, ...). The message names the problem."""
