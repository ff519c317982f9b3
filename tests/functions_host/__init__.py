"""A minimal Functions host for the tests: the real `azure-functions-runtime` over gRPC.

- `rpc.py`: message classes generated from our own `function_rpc.proto` at test time;
- `package.py`: the deployed package, built by `.funcignore` with requirements.txt installed;
- `host.py`: the host's side of the gRPC stream (start, index, load, invoke);
- `worker.py`: the worker process the host starts, which hands each request to the runtime;
- `boundary.py`: the Service Bus and Key Vault fakes, installed in that process.

None of it is deployed (`.funcignore` leaves out `tests/`). docs/runtime-tests.md explains it.
"""
