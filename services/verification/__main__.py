from services.core.bootstrap import service_main
from services.verification.app import build_app, load_config

service_main("verification", load_config, build_app)
