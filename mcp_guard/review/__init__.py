"""The reviewer's side: the terminal UI (`app.py`) and what it and the CLI show of a request."""
