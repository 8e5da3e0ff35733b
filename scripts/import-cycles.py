#!/usr/bin/env python3
"""Lists import circles between the shell's files (src/): an edge A -> B for every
`use crate::...` / `use super::...` in A that names B's module. The crate root (lib.rs),
which declares every module and holds the module's registration, is left out.
Exit status 1 if there is a circle."""
import pathlib, re, sys

src = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "src")
mods = {}
for f in src.rglob("*.rs"):
    rel = f.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "mod":
        parts = parts[:-1]
    if parts == ["lib"]:
        continue
    mods[tuple(parts)] = f

def resolve(me, path):
    segs = path.split("::")
    if segs[0] == "crate":
        base, segs = [], segs[1:]
    elif segs[0] == "super":
        base = list(me[:-1]) if not mods[me].name == "mod.rs" else list(me[:-1])
        segs = segs[1:]
        while segs and segs[0] == "super":
            base, segs = base[:-1], segs[1:]
    elif segs[0] == "self":
        base, segs = list(me), segs[1:]
    else:
        return None
    best = None
    cur = list(base)
    for s in segs:
        cur.append(s)
        if tuple(cur) in mods:
            best = tuple(cur)
    return best or (tuple(base) if tuple(base) in mods else None)

edges = {m: set() for m in mods}
for m, f in mods.items():
    text = f.read_text()
    for u in re.findall(r"^\s*(?:pub(?:\([^)]*\))?\s+)?use\s+([^;]+);", text, re.M):
        u = re.sub(r"\s+", "", u)
        heads = [u]
        if "{" in u:
            prefix, inner = u.split("{", 1)
            inner = inner.rsplit("}", 1)[0]
            depth, cur, items = 0, "", []
            for ch in inner:
                if ch == "," and depth == 0:
                    items.append(cur); cur = ""
                    continue
                depth += ch == "{"; depth -= ch == "}"
                cur += ch
            items.append(cur)
            heads = [prefix + i.split("{")[0].rstrip(":") for i in items if i]
        for h in heads:
            t = resolve(m, h.replace("::self", ""))
            if t and t != m:
                edges[m].add(t)

seen, stack, cycles = set(), [], []
def dfs(n):
    stack.append(n)
    for t in edges[n]:
        if t in stack:
            cycles.append(stack[stack.index(t):] + [t])
        elif t not in seen:
            dfs(t)
    stack.pop()
    seen.add(n)
for n in sorted(mods):
    if n not in seen:
        dfs(n)
for c in cycles:
    print(" -> ".join("/".join(x) or "lib" for x in c))
print(f"{len(mods)} files, {sum(map(len, edges.values()))} imports, {len(cycles)} circles")
sys.exit(1 if cycles else 0)
