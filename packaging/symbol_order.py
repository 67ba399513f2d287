"""Writes the functions of a binary that ran in callgrind profiles, one symbol name per line: the
linker's --symbol-ordering-file (packaging/symbol-order.sh). Those of the first profile first,
hottest (own instructions) first, then those only the next profile ran, and so on: the first
profile's code stays as dense as if it were alone.

Usage: symbol_order.py BINARY LIST CALLGRIND_OUT...
"""
import re
import subprocess
import sys

NAME_LINE = re.compile(r'^(c?ob|c?fn)=\((\d+)\)(?: (.*))?$')
COST_LINE = re.compile(r'^(?:[+-]?\d+|\*) (\d+)$')


def add_costs(profile, cost):
    """Adds each function's own cost in `profile` to `cost`, keyed by (object, name)."""
    # callgrind names each object (ob=) and function (fn=) once per file, with an id; later
    # lines give the id only. A function's own cost is on its cost lines; the line after
    # `calls=` is the callee's.
    objects, functions = {}, {}
    current_object = current = None
    callee_cost_next = False
    with open(profile, errors='replace') as lines:
        for line in lines:
            line = line.rstrip('\n')
            named = NAME_LINE.match(line)
            if named:
                kind, ident, name = named.groups()
                table = objects if kind.endswith('ob') else functions
                if name:
                    table[ident] = name
                if kind == 'ob':
                    current_object = objects[ident]
                elif kind == 'fn':
                    current = (current_object, functions[ident])
                    cost.setdefault(current, 0)
                continue
            if line.startswith('calls='):
                callee_cost_next = True
                continue
            counted = COST_LINE.match(line)
            if counted and current:
                if callee_cost_next:
                    callee_cost_next = False
                else:
                    cost[current] += int(counted.group(1))


# Functions chosen at run time by the CPU's features, valgrind's CPU having fewer: the profile
# shows the variant valgrind ran (the first pattern), while a relay on a CPU with SHA extensions
# or AVX-512 runs another (the second, `{}` the first's group), left scattered in the binary
# unless listed beside it. Patterns of mangled names, before their hash (`17h...E`; the
# numbers are the lengths of the parts of the path that follow them).
VARIANTS = [
    (r'_ZN4redb10tree_store10page_store4xxh3\d+hash(64|128)_large_avx2',
     r'_ZN4redb10tree_store10page_store4xxh3\d+hash{}_large_avx512'),
    (r'_ZN4sha26sha25611compress256()', r'_ZN4sha26sha2567x86_sha8compress{}'),
]
HASH = r'\d+h[0-9a-f]{16}E'


def with_variants(ordered, symbols):
    """`ordered`, each function followed by the binary's other variants of it (VARIANTS)."""
    out, seen = [], set(ordered)
    for name in ordered:
        out.append(name)
        for ran, other in VARIANTS:
            matched = re.fullmatch(ran + HASH, name)
            if not matched:
                continue
            wanted = re.compile(other.format(matched.group(1)) + HASH)
            for symbol in sorted(symbols - seen):
                if wanted.fullmatch(symbol):
                    seen.add(symbol)
                    out.append(symbol)
    return out


def main():
    binary, out, profiles = sys.argv[1], sys.argv[2], sys.argv[3:]
    symbols = set()
    nm = subprocess.run(['nm', binary], capture_output=True, text=True, check=True).stdout
    for entry in nm.splitlines():
        parts = entry.split()
        if len(parts) == 3 and parts[1] in 'tTwW':
            symbols.add(parts[2])
    binary_name = binary.rsplit('/', 1)[-1]
    listed, ordered = set(), []
    for profile in profiles:
        cost = {}
        add_costs(profile, cost)
        ran = {}
        for (obj, name), c in cost.items():
            if obj and obj.rsplit('/', 1)[-1] == binary_name and name in symbols:
                ran[name] = ran.get(name, 0) + c
        for name, _ in sorted(ran.items(), key=lambda entry: (-entry[1], entry[0])):
            if name not in listed:
                listed.add(name)
                ordered.append(name)
    ordered = with_variants(ordered, symbols)
    with open(out, 'w') as f:
        f.writelines(name + '\n' for name in ordered)
    print(f'{len(ordered)} functions of {binary} ran; listed in {out}', file=sys.stderr)


main()
