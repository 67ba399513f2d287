"""One benchmark row per client from the rows of its rounds (bench/run.sh).

Reads the rounds' table rows (`| client | workload | delivered | out of order | p50 | p99 | CPU |
peak RSS | growth |`) on stdin and prints one row per client named on the command line, in that
order: the median of each figure, and of delivered and out of order the worst round's, so that
a loss or a reordering in any round shows.

Usage: median_rows.py CLIENT... < rows
"""
import statistics
import sys

# Column: how its median is written.
FIGURES = {4: "{:.1f}", 5: "{:.1f}", 6: "{:.0f}", 7: "{:.1f}", 8: "{:.1f}"}


def median(rounds, column):
    values = [float(cells[column]) for cells in rounds]
    # nan: a round delivered nothing (no CPU per event); the median of it would hide that.
    if any(value != value for value in values):
        return "nan"
    return FIGURES[column].format(statistics.median(values))


def main():
    runs = {}
    for line in sys.stdin:
        if line.strip():
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            runs.setdefault(cells[0], []).append(cells)
    for name in sys.argv[1:]:
        rounds = runs.pop(name, None)
        if not rounds:
            continue
        delivered = min(rounds, key=lambda cells: int(cells[2].split("/")[0]))[2]
        out_of_order = max(int(cells[3]) for cells in rounds)
        figures = " | ".join(median(rounds, column) for column in sorted(FIGURES))
        print(f"| {name} | {rounds[0][1]} | {delivered} | {out_of_order} | {figures} |")


main()
