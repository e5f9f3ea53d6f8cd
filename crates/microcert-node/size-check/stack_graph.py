#!/usr/bin/env python3
"""Worst-case stack depth of C entry points of the size-check staticlib on
Thumb-2, from the linked image's disassembly.

usage: stack_graph.py ELF [root ...]        (default roots: mc_auth mc_seal)

Each function's own frame is the sum of its `push`, `push.w`, `vpush` and
`sub sp` instructions (an upper bound when shrink-wrapping puts prologues
on several paths); where rustc's .stack_sizes (-Z emit-stack-sizes) has an
entry for the function, that exact figure is used instead. Calls are
`bl`/`b`/`b.w` to a symbol, and for `blx rN` every function whose address
sits in the caller's literal pool (-Oz calls a repeated callee through a
register loaded from the pool): an over-approximation, so the result is an
upper bound of the static call graph. Recursion would be reported.
"""
import re
import subprocess
import sys

elf = sys.argv[1]
roots = sys.argv[2:] or ["mc_auth", "mc_seal"]


def run(*args):
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


exact = {}
cur = None
for line in run("llvm-readobj", "--stack-sizes", elf).splitlines():
    m = re.search(r"Functions: \[(.*)\]", line)
    if m:
        cur = [f.strip() for f in m.group(1).split(",")]
        continue
    m = re.search(r"Size: 0x([0-9a-f]+)", line)
    if m and cur:
        for f in cur:
            exact[f] = int(m.group(1), 16)
        cur = None

addr_of = {}
for line in run("llvm-nm", elf).splitlines():
    parts = line.split()
    if len(parts) == 3 and parts[1] in "tTwW":
        addr_of[int(parts[0], 16) & ~1] = parts[2]

frame, calls, pool, regcall = {}, {}, {}, set()
fn, data = None, False
for line in run("llvm-objdump", "-d", "--no-show-raw-insn", elf).splitlines():
    m = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
    if m:
        name = m.group(1)
        if name.startswith("$d"):
            data = True
        elif name.startswith("$t"):
            data = False
        else:
            fn, data = name, False
            frame.setdefault(fn, 0)
            calls.setdefault(fn, set())
            pool.setdefault(fn, set())
        continue
    if fn is None:
        continue
    if data:
        m = re.search(r"\.word\s+0x([0-9a-f]+)", line)
        if m and (int(m.group(1), 16) & ~1) in addr_of:
            pool[fn].add(addr_of[int(m.group(1), 16) & ~1])
        continue
    m = re.search(r"\t(push|push\.w|vpush)\t\{([^}]*)\}", line)
    if m:
        regs = [r.strip() for r in m.group(2).split(",")]
        n = 0
        for r in regs:
            rng = re.match(r"d(\d+)-d(\d+)", r)
            if rng:
                n += 8 * (int(rng.group(2)) - int(rng.group(1)) + 1)
            else:
                n += 8 if r.startswith("d") else 4
        frame[fn] += n
        continue
    m = re.search(r"\t(sub|sub\.w|subw)\tsp, (?:sp, )?#(\d+)", line)
    if m:
        frame[fn] += int(m.group(2))
        continue
    if re.search(r"\tsub(\.w)?\tsp, (sp, )?r\d+", line):
        sys.exit(f"dynamic stack allocation in {fn}")
    m = re.search(r"\t(bl|b|b\.w|b\w\w\.w)\t.*<([^>+]+)(\+0x[0-9a-f]+)?>", line)
    if m and m.group(2) != fn and not m.group(2).startswith("$"):
        calls[fn].add(m.group(2))
    elif re.search(r"\tblx\tr\d+", line):
        regcall.add(fn)

for f in regcall:
    calls[f] |= pool[f]


def own(f):
    return exact.get(f, frame.get(f, 0))


memo = {}


def worst(f, stack=()):
    if f in stack:
        sys.exit(f"recursion through {f}")
    if f not in memo:
        best, path = 0, []
        for g in calls.get(f, ()):
            s, p = worst(g, stack + (f,))
            if s > best:
                best, path = s, p
        memo[f] = (own(f) + best, [(f, own(f))] + path)
    return memo[f]


def resolve(root):
    # An exact symbol, or every function whose (mangled) name contains it.
    if root in calls:
        return [root]
    return sorted(f for f in calls if root in f)


for root in [f for r in roots for f in resolve(r)]:
    total, path = worst(root)
    print(f"{root}: {total} bytes worst case")
    for f, n in path:
        print(f"  {n:6d}  {f[:120]}")
