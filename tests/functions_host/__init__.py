"""A minimal Functions host for the tests: the real `azure-functions-runtime` over gRPC.

- `rpc.py`: message classes generated from our own `function_rpc.proto` at test time;
- `package.py`: the deployed package, built by `.funcignore` with requirements.txt installed;
- `host.py`: the host's side of the gRPC stream (start, index, load, invoke);
- `worker.py`: the worker process the host starts, which hands each request to the runtime;
- `boundary.py`: the Service Bus and Key Vault fakes, installed in that process.

None of it is deployed (`.funcignore` leaves out `tests/`). docs/testing.md ("The real Functions runtime") explains it.
"""

import os

# The test host keeps a gRPC server and channel alive in the pytest process, and other tests
# fork from it (`subprocess` with `preexec_fn`). With gRPC's fork handlers on, about one such
# child in ten crashed before its exec (SIGSEGV). Nothing here forks while using gRPC, so the
# handlers are turned off; gRPC reads this when it is first imported, which is after this line.
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"
