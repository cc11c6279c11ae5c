"""The library's error for bad input: reported as one line naming what is wrong, no traceback."""


class UserError(Exception):
    """Bad input from the user (a file, a row, a setting): reported in one line, no traceback."""


class BadImageError(UserError):
    """An image file is missing or cannot be decoded."""
