"""The VM-side supervisor: one ipykernel under a lease, its control lines and its resumable streams.

Sent to the VM as a bundled program (``relaykernel.bundle``), never installed there; standard library only,
Python 3.8+. The entry point is ``relaykernel.vm.supervisor.main``; its docstring describes the protocol.
"""
