"""`ray start` / `ray stop` for the tests, with every Ray process on the loopback interface.

Ray replaces a 127.0.0.1 address by the machine's outward address (so that other machines can reach the
node) unless the process has RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which `ray start --address` refuses (it
means "no multi-node clusters"). The tests start the head with that variable, and the second node through
this wrapper, which keeps the address it is given: then the head's and the second node's servers listen on
127.0.0.1 only and nothing connects anywhere else. Usage: python tests/ray_node.py start --address ...
"""

import sys

import ray._private.services as services

services.resolve_ip_for_localhost = lambda host: host  # keep 127.0.0.1 as given

if __name__ == "__main__":
    from ray.scripts.scripts import main

    sys.argv[0] = "ray"
    sys.exit(main())
