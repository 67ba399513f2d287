"""One benchmark row per client from the rows of its rounds (bench/run.sh).

Reads the rounds' table rows (`| client | workload | delivered | out of order | p50 | p99 | CPU |
peak RSS | growth |`) on stdin and prints one row per client named on the command line, in that
order: the median of each figure, and of delivered and out of order the worst round's, so that
a loss or a reordering in any round shows. Latency and CPU per event come from the rounds that
delivered something (a round that delivered nothing reports 0 ms and no CPU per event, which
would pull the median down or make it "nan"); "nan" when none did.

Usage: median_rows.py CLIENT... < rows
"""
import statistics
import sys

# Column: how its median is written.
FIGURES = {4: "{:.1f}", 5: "{:.1f}", 6: "{:.0f}", 7: "{:.1f}", 8: "{:.1f}"}


# Figures of what was delivered: only rounds that delivered something have them.
PER_DELIVERED = (4, 5, 6)


def delivered(cells):
    return int(cells[2].split("/")[0])


def median(rounds, column):
    if column in PER_DELIVERED:
        rounds = [cells for cells in rounds if delivered(cells) > 0]
    if not rounds:
        return "nan"
    return FIGURES[column].format(statistics.median(float(cells[column]) for cells in rounds))


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
        worst = min(rounds, key=delivered)[2]
        out_of_order = max(int(cells[3]) for cells in rounds)
        figures = " | ".join(median(rounds, column) for column in sorted(FIGURES))
        print(f"| {name} | {rounds[0][1]} | {worst} | {out_of_order} | {figures} |")


main()
