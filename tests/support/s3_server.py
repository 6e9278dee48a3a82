"""An S3-compatible server for the registry tests: moto's server (PyPI `moto[server]`), on
127.0.0.1 and a free port, which it prints as `listening PORT`. It serves until its standard
input closes (the test that started it ended, or died). Conditional writes (If-Match,
If-None-Match), conditional reads and listings behave as S3's; no credentials are checked.
"""
import sys

from moto.server import ThreadedMotoServer

server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
_, port = server.get_host_and_port()
print(f"listening {port}", flush=True)
sys.stdin.read()
server.stop()
