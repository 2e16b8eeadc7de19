"""`python -m services.directory`."""

from services.core.bootstrap import service_main
from services.directory.app import build_app, load_config

if __name__ == "__main__":
    service_main("directory", load_config, build_app)
