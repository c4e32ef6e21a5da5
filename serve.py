"""Serve the REST API and web UI: python serve.py [port=18080] [api_key=secret] [key=value ...]"""

from ml_engine.cli import launch
from ml_engine.server.serve import serve

if __name__ == "__main__":
    launch(serve, config_name="serve")
