"""python -m services.delivery"""

from services.core.bootstrap import service_main
from services.delivery.app import build_app
from services.delivery.config import load_config

if __name__ == "__main__":
    service_main("delivery", load_config, build_app)
