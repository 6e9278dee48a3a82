# usage: perf script -i OUT.data -F comm,ip,sym,dso --no-inline > OUT.script; python3 categories.py OUT.script
# Sorts each sample of a server profile (from ../2026-12-06-stream-timers/prof.sh, PERF=1) into
# the first category its stack matches, in the order below, and prints the shares.
import sys, collections
path = sys.argv[1]
cats = collections.Counter(); n = 0
rules = [
 ("worker: ONNX Runtime", lambda c, s: c.startswith('worker') and any('onnxruntime' in f or 'OrtApis' in f or 'Ort' in f[:4] for f in s)),
 ("worker: other", lambda c, s: c.startswith('worker')),
 ("send(2) of results", lambda c, s: any('__libc_send' in f or '__x64_sys_sendto' in f for f in s)),
 ("recv(2) of frames", lambda c, s: any('__libc_recv' in f or '__x64_sys_recvfrom' in f for f in s)),
 ("sleeping and waking (epoll, scheduler)", lambda c, s: any('Context::park' in f or 'epoll_wait' in f for f in s)),
 ("stream session (actor: steps, router, results)", lambda c, s: any('stream_session' in f for f in s)),
 ("WS reader task (decode, credits, to the session)", lambda c, s: any('api::ws::connection' in f or 'read_loop' in f for f in s)),
 ("WS writer task", lambda c, s: any('write_loop' in f for f in s)),
 ("actix-http dispatcher (WS frames in and out)", lambda c, s: any('dispatcher' in f for f in s)),
]
stack = []; comm = None
def flush():
    global n
    if comm is None: return
    n += 1
    for name, rule in rules:
        if rule(comm, stack): cats[name] += 1; return
    cats["other (" + comm[:12] + ")"] += 1
for line in open(path):
    if not line.startswith('\t') and not line.startswith(' '):
        flush(); stack = []; comm = line.strip().split(' ')[0] if line.strip() else None
        if not line.strip(): comm = None
        continue
    parts = line.strip().split(' ', 1)
    if len(parts) == 2: stack.append(parts[1])
flush()
for k, v in cats.most_common(): print(f"{100*v/n:5.1f}%  {k}")
print(n, "samples")
