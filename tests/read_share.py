"""One host of several: joins the others with jax.distributed at 127.0.0.1:PORT, then prints what it
reads of each source (tests/sources.py), as JSON.

    python tests/read_share.py SOURCES_JSON PORT PROCESS_ID PROCESS_COUNT
"""

import json
import sys

import jax

from sources import dump, read_share

if __name__ == "__main__":
    sources, port, process_id, count = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    jax.distributed.initialize(f"127.0.0.1:{port}", count, process_id, initialization_timeout=120)
    print(dump(read_share(sources, jax.process_index(), jax.process_count())))
