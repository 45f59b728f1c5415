#!/usr/bin/env python3
"""Scrapes a herd instance's Prometheus endpoint and prints every sample as JSON.

usage: scrape-metrics.py http://127.0.0.1:9464/metrics

The exposition is parsed by the Prometheus project's own Python parser (PyPI `prometheus-client`,
its OpenMetrics parser, as the content type says), so what a test reads is what Prometheus reads.
Exits non-zero when the endpoint cannot be read, says another content type, or does not parse.
"""

import json
import sys
import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families


def main() -> int:
    url = sys.argv[1]
    with urllib.request.urlopen(url, timeout=10) as response:
        content_type = response.headers.get("Content-Type", "")
        text = response.read().decode("utf-8")
    if not content_type.startswith("application/openmetrics-text"):
        print(f"{url}: content type {content_type!r}", file=sys.stderr)
        return 1
    samples = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.append(
                {
                    "family": family.name,
                    "type": family.type,
                    "name": sample.name,
                    "labels": dict(sample.labels),
                    "value": sample.value,
                }
            )
    json.dump(samples, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
