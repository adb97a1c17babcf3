"""Reads what Helios shows operators, with real parsers, for tests/tests/observability.rs.

  observe.py metrics URL
      Scrapes URL/metrics twice: as Prometheus text (no Accept header, like curl) and as
      OpenMetrics (the Accept header the Prometheus server sends). Parses each with the
      prometheus_client package's parser for that format (both raise on malformed text) and
      prints {"prometheus": SAMPLES, "openmetrics": SAMPLES, "types": {family: type},
      "content_types": [..]}, SAMPLES mapping `name{label="value",...}` (labels sorted) to the
      value.

  observe.py complete URL MODEL PROMPT MAX_TOKENS TRACEPARENT
      One non-streamed POST URL/v1/completions with a `traceparent` header; prints the JSON
      answer.
"""

import json
import sys

import httpx
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families as prometheus_families

OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"


def samples(families):
    out, types = {}, {}
    for family in families:
        types[family.name] = family.type
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out, types


def metrics(url):
    plain = httpx.get(f"{url}/metrics", timeout=30)
    plain.raise_for_status()
    om = httpx.get(f"{url}/metrics", headers={"accept": OPENMETRICS}, timeout=30)
    om.raise_for_status()
    prometheus, types = samples(prometheus_families(plain.text))
    openmetrics, _ = samples(openmetrics_families(om.text))
    print(
        json.dumps(
            {
                "prometheus": prometheus,
                "openmetrics": openmetrics,
                "types": types,
                "content_types": [plain.headers["content-type"], om.headers["content-type"]],
            }
        )
    )


def complete(url, model, prompt, max_tokens, traceparent):
    r = httpx.post(
        f"{url}/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": int(max_tokens)},
        headers={"traceparent": traceparent},
        timeout=120,
    )
    r.raise_for_status()
    print(json.dumps(r.json()))


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    {"metrics": metrics, "complete": complete}[mode](*args)
