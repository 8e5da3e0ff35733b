#!/usr/bin/env python3
"""The shell's layers, checked.

Reads every file of the module crate (src/, lib.rs included) and of the core (core/src/):
each `use` line (braces expanded) and each path written inline (`crate::a::b`, `super::x`,
`self::x`, `mesh_core::x`, and in a file that declares modules, `child::x`). An edge A -> B
says file A names an item of file B.

Prints the folder graph of the shell and fails (exit 1) on
  - an upward edge: a folder naming a folder at or above its own layer in LAYERS
    (lib.rs's module handle excepted, for the folders HANDLE lists);
  - a circle between files, in either crate (a file naming its own folder's mod.rs, the
    folder's shared types, does not count towards a circle);
  - a shared zone's mutex taken or released by hand (`ngx_shmtx_lock`/`_unlock`): zones are
    locked through `ngx::core::SlabPool::lock`, whose guard unlocks when dropped, so a panic
    (caught before it reaches nginx) never leaves a zone locked;
  - README.md's layout section not showing the graph as printed.

    python3 scripts/layers.py            check, print the folder graph
    python3 scripts/layers.py --files    also print every file's edges
"""
import pathlib
import re
import sys

# Top to bottom: a folder may name only folders after it.
LAYERS = ["lib", "request", "conf", "state", "nginx", "mesh-core"]
# lib.rs registers the module; nginx finds a module's configuration through its handle, so
# the folders that read the configuration (it is conf/'s types) may name the handle.
HANDLE = {"MeshModule": {"request", "conf"}}

ROOT = pathlib.Path(__file__).resolve().parent.parent
CRATES = [
    # (source dir, the name other crates use for it, the folder this crate counts as)
    (ROOT / "src", None, None),
    (ROOT / "core" / "src", "mesh_core", "mesh-core"),
]


def strip(text):
    """Source text with comments, string and char literals blanked (lines kept)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    if text[i] == "\n":
                        out.append("\n")
                    i += 1
        elif re.match(r'b?r#*"', text[i:i + 40]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'b?r(#*)"', text[i:])
            end = text.find('"' + m.group(1), i + m.end())
            end = n if end < 0 else end + 1 + len(m.group(1))
            out.append("\n" * text.count("\n", i, end) + '""')
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append("\n" * text.count("\n", i, j) + '""')
            i = j + 1
        elif c == "'":
            m = re.match(r"'(\\.[^']*|[^\\'])'", text[i:])
            if m:
                out.append("' '")
                i += m.end()
            else:  # a lifetime
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def expand(tree):
    """`a::{b, c::{d as x, e}}` -> ['a::b', 'a::c::d', 'a::c::e']."""
    tree = re.sub(r"\s+", "", re.sub(r"\s+as\s+\w+", "", tree))
    if "{" not in tree:
        return [tree]
    prefix, inner = tree.split("{", 1)
    inner = inner.rsplit("}", 1)[0]
    items, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    items.append(cur)
    out = []
    for it in items:
        if it:
            out += [prefix + x for x in expand(it)]
    return out


class Crate:
    def __init__(self, src, extern, folder):
        self.src, self.extern, self.folder = src, extern, folder
        self.mods = {}  # module path (tuple) -> file
        for f in sorted(src.rglob("*.rs")):
            parts = list(f.relative_to(src).with_suffix("").parts)
            if parts[-1] in ("mod", "lib"):
                parts = parts[:-1]
            self.mods[tuple(parts)] = f

    def name(self, m):
        return (self.folder + "/" if self.folder else "") + ("/".join(m) or "lib")

    def folder_of(self, m):
        if self.folder:
            return self.folder
        if not m:
            return "lib"
        if (self.src / m[0]).is_dir():
            return m[0]
        return "lib"  # a file beside lib.rs counts as the crate root

    def declares_children(self, m):
        return self.mods[m].name in ("mod.rs", "lib.rs")

    def longest(self, base, segs):
        """The deepest module along `base` + `segs`, and the name that follows it."""
        cur, best, rest = list(base), None, None
        for i, seg in enumerate(segs):
            cur.append(seg)
            if tuple(cur) in self.mods:
                best = tuple(cur)
                rest = segs[i + 1] if i + 1 < len(segs) else None
            else:
                break
        if best is None and tuple(base) in self.mods:
            best, rest = tuple(base), segs[0] if segs else None
        return best, rest


def resolve(crates, crate, me, path):
    """(crate, module, the item named in it) for a path, or None for std, ngx and the like."""
    segs = [s for s in path.split("::") if s]
    if not segs:
        return None
    head = segs[0]
    if head == "crate":
        return (crate, *crate.longest([], segs[1:]))
    if head in ("super", "self"):
        base = list(me)
        while segs and segs[0] in ("super", "self"):
            if segs[0] == "super":
                base = base[:-1]
            segs = segs[1:]
        return (crate, *crate.longest(base, segs))
    for other in crates:
        if other.extern and head == other.extern:
            return (other, *other.longest([], segs[1:]))
    # A bare path from a file that declares modules: `child::item`.
    if crate.declares_children(me) and tuple(me) + (head,) in crate.mods:
        return (crate, *crate.longest(list(me), segs))
    return None


PATH = re.compile(r"(?<![\w:])((?:crate|super|self|mesh_core|[a-z_][a-z0-9_]*)(?:::[A-Za-z_]\w*)+)")
USE = re.compile(r"(?:^|[;{}\]])\s*(?:pub(?:\([^)]*\))?\s+)?use\s+([^;]+);", re.M)


def edges_of(crates):
    """(crate, module) -> {(crate, module): the names it uses there}."""
    edges = {}
    for crate in crates:
        for m, f in crate.mods.items():
            text = strip(f.read_text())
            out = {}
            paths = []
            for u in USE.findall(text):
                paths += expand(u)
            text = USE.sub(";", text)
            paths += PATH.findall(text)
            for p in paths:
                p = re.sub(r"::self$", "", p)
                r = resolve(crates, crate, m, p)
                if r and r[1] is not None and (r[0], r[1]) != (crate, m):
                    out.setdefault((r[0], r[1]), set()).add(r[2])
            edges[(crate, m)] = out
    return edges


def circles(edges):
    """Circles between files. A file naming its own folder's mod.rs (the folder's shared
    types, `super::X`) is not counted: that file is part of the folder the mod.rs stands for."""
    key = lambda x: (str(x[0].src), x[1])

    def counted(n, t):
        return not (n[0] is t[0] and t[1] and n[1][: len(t[1])] == t[1]
                    and t[0].mods[t[1]].name == "mod.rs")

    found, done, stack = [], set(), []

    def dfs(n):
        stack.append(n)
        for t in sorted(edges[n], key=key):
            if not counted(n, t):
                continue
            if t in stack:
                found.append(stack[stack.index(t):] + [t])
            elif t not in done:
                dfs(t)
        stack.pop()
        done.add(n)

    for n in sorted(edges, key=key):
        if n not in done:
            dfs(n)
    return found


def main():
    crates = [Crate(*c) for c in CRATES]
    edges = edges_of(crates)
    shell = crates[0]
    folders = {}  # folder -> {folder: [(file, file)]}
    handle_users = {}  # handle name -> folders naming it
    problems = []
    for (c, m), ts in edges.items():
        if c is not shell:
            continue
        a = shell.folder_of(m)
        for (tc, t), names in list(ts.items()):
            b = tc.folder if tc is not shell else shell.folder_of(t)
            if b == "lib" and a != "lib" and names and names <= set(HANDLE):
                for h in names:
                    handle_users.setdefault(h, set()).add(a)
                    if a not in HANDLE[h]:
                        may = ", ".join(f + "/" for f in sorted(HANDLE[h]))
                        problems.append(f"{c.name(m)} names {h}: only {may} may")
                del ts[(tc, t)]
                continue
            if a != b:
                folders.setdefault(a, {}).setdefault(b, []).append((c.name(m), tc.name(t)))
    rank = lambda f: LAYERS.index(f) if f in LAYERS else -1
    for a in sorted(folders, key=rank):
        for b, why in folders[a].items():
            for f in (a, b):
                if f not in LAYERS:
                    problems.append(f"folder {f} is in no layer: add it to LAYERS in {__file__}")
            if a in LAYERS and b in LAYERS and rank(b) <= rank(a):
                for x, y in sorted(set(why)):
                    problems.append(f"upward edge {a} -> {b}: {x} -> {y}")
    for c in circles(edges):
        problems.append("circle: " + " -> ".join(k.name(m) for k, m in c))
    for m, f in shell.mods.items():
        for n, line in enumerate(strip(f.read_text()).splitlines(), 1):
            if re.search(r"\bngx_shmtx_(try)?(lock|unlock)\b", line):
                problems.append(f"{f.relative_to(ROOT)}:{n}: a zone locked by hand: use SlabPool::lock")

    graph = []
    for a in LAYERS[:-1]:
        below = sorted(folders.get(a, {}), key=rank)
        graph.append(f"{a + '/' if a != 'lib' else 'lib.rs':9} -> {', '.join(below) or '(nothing)'}")
    for h, users in sorted(handle_users.items()):
        named_by = ", ".join(f + "/" for f in sorted(users, key=rank))
        graph.append(f"the module handle {h} (lib.rs) is named by: {named_by}")
    print("folder graph (each folder names only folders below it):")
    for line in graph:
        print("  " + line)
    if "```\n" + "\n".join(graph) + "\n```" not in (ROOT / "README.md").read_text():
        problems.append("README.md's layout section does not show this graph (a ``` block)")
    if "--files" in sys.argv:
        for (c, m), ts in sorted(edges.items(), key=lambda x: (str(x[0][0].src), x[0][1])):
            print(f"  {c.name(m)}: {', '.join(sorted(k.name(t) for k, t in ts))}")
    nfiles = sum(len(c.mods) for c in crates)
    nedges = sum(len(v) for v in edges.values())
    for p in problems:
        print("error:", p)
    print(f"{nfiles} files, {nedges} file edges, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
