"""A client used before a fork keeps working in the child (pre-forking servers, multiprocessing's
fork start method) without sharing anything that is the parent's: a real os.fork, in a fresh
interpreter, against the independent peer."""
import json

from tests.helpers import run_python

FORK_SCRIPT = """
    import asyncio, json, os, sys, warnings
    warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads: on purpose
    from tests.peer_server import PeerServer
    from nomyo import SecureChatCompletion

    peer = PeerServer()
    msg = [{"role": "user", "content": "before the fork"}]
    used = SecureChatCompletion(base_url=peer.url, allow_http=True, key_size=2048)
    used.create_sync(model="m", messages=msg)       # a kept-alive connection, idle buffers
    # a 4096-bit pair takes a while: its birth is still under way when the fork comes
    unborn = SecureChatCompletion(base_url=peer.url, allow_http=True, key_size=4096)

    def child():
        sync = used.create_sync(model="m", messages=[{"role": "user", "content": "child"}])
        async def two():
            return await asyncio.gather(*(used.create(model="m", messages=msg)
                                          for _ in range(2)))
        asyncio.run(two())
        late = unborn.create_sync(model="m", messages=msg)
        ok = (sync["choices"][0]["message"]["content"].endswith("child")
              and late["choices"][0]["message"]["content"])
        return 0 if ok else 3

    before = len(peer.received)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            code = child()
        except BaseException as exc:
            os.write(w, f"{type(exc).__name__}: {exc}".encode()[:500])
            code = 9
        os._exit(code)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    err = os.read(r, 600).decode()
    in_child = peer.received[before:]
    after = used.create_sync(model="m", messages=msg)  # the parent's pool is intact
    print(json.dumps({
        "status": os.waitstatus_to_exitcode(status), "error": err,
        "parent_port": peer.received[0]["client"][1],
        "child_ports": sorted({r["client"][1] for r in in_child}),
        "after_port": peer.received[-1]["client"][1],
        "after_ok": bool(after["choices"][0]["message"]["content"]),
    }))
"""


def test_a_client_used_before_fork_works_in_the_child_on_its_own_connections():
    # Before the fix the child's first request raised "secure buffer belongs to the parent
    # process" (an idle workspace of the parent's), and its connection was the parent's.
    proc = run_python(FORK_SCRIPT, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["status"] == 0, out["error"]
    assert out["child_ports"], "the child's requests never reached the peer"
    assert out["parent_port"] not in out["child_ports"]  # never the parent's connection
    assert out["after_ok"] and out["after_port"] == out["parent_port"]
