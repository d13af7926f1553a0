"""`python -m tuning CONFIG.yaml [--resume] [--address ADDR]`: the Ray Job entrypoint."""

import sys

from transferdesk.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
