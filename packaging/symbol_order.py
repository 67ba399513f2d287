"""Writes the functions of a binary that ran in a callgrind profile, hottest (own instructions)
first, one symbol name per line: the linker's --symbol-ordering-file (packaging/symbol-order.sh).

Usage: symbol_order.py CALLGRIND_OUT BINARY LIST
"""
import re
import subprocess
import sys

profile, binary, out = sys.argv[1:4]
# callgrind names each object (ob=) and function (fn=) once, with an id; later lines give the id
# only. A function's own cost is on its cost lines; the line after `calls=` is the callee's.
objects, functions = {}, {}
cost = {}
current_object = current = None
callee_cost_next = False
name_line = re.compile(r'^(c?ob|c?fn)=\((\d+)\)(?: (.*))?$')
cost_line = re.compile(r'^(?:[+-]?\d+|\*) (\d+)$')
with open(profile, errors='replace') as lines:
    for line in lines:
        line = line.rstrip('\n')
        named = name_line.match(line)
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
        counted = cost_line.match(line)
        if counted and current:
            if callee_cost_next:
                callee_cost_next = False
            else:
                cost[current] += int(counted.group(1))

symbols = set()
nm = subprocess.run(['nm', binary], capture_output=True, text=True, check=True).stdout
for entry in nm.splitlines():
    parts = entry.split()
    if len(parts) == 3 and parts[1] in 'tTwW':
        symbols.add(parts[2])
binary_name = binary.rsplit('/', 1)[-1]
ran = [(c, name) for (obj, name), c in cost.items()
       if obj and obj.rsplit('/', 1)[-1] == binary_name and name in symbols]
ran.sort(key=lambda entry: (-entry[0], entry[1]))
with open(out, 'w') as f:
    f.writelines(name + '\n' for _, name in ran)
print(f'{len(ran)} functions of {binary} ran; listed in {out}', file=sys.stderr)
