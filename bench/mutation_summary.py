"""
Per-module mutation scores from ``mutmut results --all true`` (read on stdin).

``make mutation`` pipes mutmut's results here. Mutants listed in the equivalents file
(one ``name  reason`` a line, ``#`` comments) were reviewed and cannot change an output;
they count as explained, not as survivors. Any other survivor is printed by name: kill it
with a test whose expected value is computed independently, or explain it there.

A timeout is not counted as caught: mutmut stops a mutant when its tests run too long,
which is an endless loop the mutant made, or every test passing slowly, or a test that
hangs in mutmut's forked worker (rclpy does).  Each one is printed by name for review and
is left out of the score unless the equivalents file explains it.
"""

import argparse
from collections import Counter, defaultdict
import re
import sys

# The estimator is mutated for its timestep schedule and DDIM update only.
SCOPE = {'marigold_model.estimator': ('_schedule', '_closed_form_ddim', '_ddim_step')}
LINE = re.compile(r'^\s*(?P<name>\S+?__mutmut_\d+): (?P<status>.+?)\s*$')


def _module_and_function(name):
    module, _, mangled = name.rpartition('.x')
    function = mangled.split('__mutmut_')[0].split('ǁ')[-1].lstrip('_')
    return module, function


def _in_scope(module, function):
    wanted = SCOPE.get(module)
    return wanted is None or any(function == w.lstrip('_') for w in wanted)


def read_equivalents(path):
    """Return {mutant name: reason} from the equivalents file."""
    explained = {}
    with open(path, encoding='utf-8') as stream:
        for line in stream:
            line = line.split('#', 1)[0].strip() if line.lstrip().startswith('#') else line
            parts = line.strip().split(None, 1)
            if parts:
                explained[parts[0]] = parts[1] if len(parts) > 1 else ''
    return explained


def summarise(lines, explained):
    """Count statuses per module; return (counts by module, unexplained survivors)."""
    counts = defaultdict(Counter)
    open_survivors = []
    for line in lines:
        match = LINE.match(line)
        if not match:
            continue
        name, status = match['name'], match['status']
        module, function = _module_and_function(name)
        if not _in_scope(module, function) or status == 'not checked':
            continue
        if status in ('survived', 'timeout') and name in explained:
            status = 'equivalent'
        elif status in ('survived', 'timeout'):
            open_survivors.append(f'{name} ({status})')
        counts[module][status] += 1
    return counts, open_survivors


def main(argv=None):
    """Print the table; with --strict exit 1 if a survivor is neither killed nor explained."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--equivalent', default='bench/mutation_equivalent.txt')
    parser.add_argument('--strict', action='store_true',
                        help='fail on open survivors and unexplained timeouts')
    args = parser.parse_args(argv)
    counts, open_survivors = summarise(sys.stdin, read_equivalents(args.equivalent))
    columns = ('killed', 'survived', 'equivalent', 'timeout', 'no tests', 'suspicious')
    print(f'{"module":32} {"total":>6} ' + ' '.join(f'{c:>10}' for c in columns)
          + '   score')
    for module in sorted(counts):
        c = counts[module]
        total = sum(c.values())
        score = (c['killed'] + c['equivalent']) / max(1, total)
        print(f'{module:32} {total:6d} ' + ' '.join(f'{c[k]:10d}' for k in columns)
              + f'   {100 * score:5.1f} %')
    if open_survivors:
        print(f'\n{len(open_survivors)} survivor(s) or timeout(s) neither killed nor '
              'explained (mutmut show NAME):')
        for name in open_survivors:
            print('   ', name)
    return 1 if open_survivors and args.strict else 0


if __name__ == '__main__':
    sys.exit(main())
