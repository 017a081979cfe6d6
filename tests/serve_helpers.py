"""A `moa serve` subprocess on loopback for tests: its address, the openai clients, raw HTTP and its metrics."""
import http.client
import json
import re
import subprocess
import sys
import time
from urllib.parse import urlparse

from openai import AsyncOpenAI, OpenAI


class Server:
    """`python -m moa serve ... --port 0` in a subprocess; its address read from the line it prints."""

    def __init__(self, tmp_path, *args, api_key="unused", env=None):
        self.log = open(tmp_path / f"serve-{time.monotonic_ns()}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "moa", "serve", *map(str, args), "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        line = self.proc.stdout.readline()
        match = re.search(r"on (http://[\d.]+:\d+)$", line.strip())
        assert match, f"no address printed: {line!r}\n{self.stderr()}"
        self.url = match.group(1)
        self.host, self.port = urlparse(self.url).hostname, urlparse(self.url).port
        self.api_key = api_key
        self.client = OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0)
        self.aclient = AsyncOpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0)

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def request(self, method, path, body=None, headers=None, timeout=60):
        """(status, headers (case-insensitive), bytes) of one raw HTTP request; `body` is bytes or a JSON-able object."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json",
                                                       "Authorization": f"Bearer {self.api_key}", **(headers or {})})
        response = conn.getresponse()
        out = response.status, response.headers, response.read()
        conn.close()
        return out

    def metrics(self) -> dict[str, float]:
        status, _, text = self.request("GET", "/metrics")
        assert status == 200
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.decode().splitlines() if line and not line.startswith("#")}

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.log.close()
