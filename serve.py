"""Serve the REST API and web UI: python serve.py [port=18080] [api_key=secret] [key=value ...]"""

from ml_engine.__main__ import launch_task

if __name__ == "__main__":
    launch_task("serve")
