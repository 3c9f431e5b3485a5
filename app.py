"""`python app.py`: serve PicTrace on http://PICTRACE_HOST:PICTRACE_PORT (default 127.0.0.1:5000)."""

from pictrace.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["serve"]))
