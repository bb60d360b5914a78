"""The results tables as Markdown, CSV and a bar plot.

Every accuracy column names its metric: `final epoch` (the last evaluation, the
protocol-clean number) or `best of evaluations` (the best test accuracy over the
periodic evaluations, what the PyTorch peers report). Missing tasks and incomplete
averages are written as such, never as numbers.
"""

from __future__ import annotations

import csv
import decimal
import os
from typing import Sequence

from mlae_jax.sweeps import paper
from mlae_jax.sweeps.table import METRIC_LABELS, Row, Stat, Table

MISSING = 'missing'
INCOMPLETE = 'incomplete'
SUMMARY_CSV, RUNS_CSV, REPORT_MD = 'summary.csv', 'runs.csv', 'report.md'


def _number(value: float | None) -> str:
  """Two decimals, rounded half up after float noise is dropped (the paper's 87.525
  prints as 87.53, not 87.52)."""
  if value is None:
    return ''
  exact = decimal.Decimal(repr(round(value, 9)))
  return str(exact.quantize(decimal.Decimal('0.01'), rounding=decimal.ROUND_HALF_UP))


def _stat(stat: Stat | None, with_std: bool = True) -> str:
  if stat is None:
    return ''
  if with_std and stat.std is not None:
    return f'{_number(stat.mean)} ± {_number(stat.std)}'
  return _number(stat.mean)


def _status(row: Row) -> str:
  if row.complete:
    return 'ok'
  if row.kind == 'task':
    return MISSING
  return f'{INCOMPLETE}: missing {", ".join(row.missing)}'


def _cell(row: Row, key: str, with_std: bool = True) -> str:
  stat = getattr(row, key)
  if stat is not None:
    return _stat(stat, with_std)
  return MISSING if row.kind == 'task' else f'{INCOMPLETE} ({len(row.missing)} missing)'


def _seeds(row: Row) -> str:
  if row.kind == 'aggregate':
    if not row.complete:
      return ''
    return ', '.join(map(str, row.final.seeds)) if row.final.seeds else 'differ by task'
  text = ', '.join(map(str, row.final.seeds)) if row.final else ''
  if row.unfinished_seeds:
    text += f' ({", ".join(map(str, row.unfinished_seeds))} unfinished)'
  return text.strip()


def _difference(row: Row, key: str) -> float | None:
  stat = getattr(row, key)
  return None if stat is None or row.paper is None else stat.mean - row.paper


def _markdown_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
  out = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  out += ['| ' + ' | '.join(line) + ' |' for line in lines]
  return out


def benchmark_markdown(table: Table) -> str:
  """The paper-style row table (tasks as columns), the per-task detail and the notes."""
  has_paper = any(row.paper is not None for row in table.rows)
  lines = [f'## {table.benchmark.title}', '',
           'Test accuracy (%), mean over seeds; ± is the sample std over seeds (ddof=1).', '']
  wide = [['ours, final epoch'] + [_cell(row, 'final', False) for row in table.rows],
          ['ours, best of evaluations'] + [_cell(row, 'best', False) for row in table.rows]]
  if has_paper:
    wide.insert(0, [table.paper_label] + [_number(row.paper) or '—' for row in table.rows])
  lines += _markdown_table(['method'] + [row.short for row in table.rows], wide) + ['']

  header = ['task / average', 'group', 'seeds', 'setting', 'final epoch',
            'best of evaluations']
  if has_paper:
    header += [table.paper_label, 'best of evaluations − paper']
  detail = []
  for row in table.rows:
    line = [row.label if row.kind == 'task' else f'**{row.label}**', row.group, _seeds(row),
            row.setting, _cell(row, 'final'), _cell(row, 'best')]
    if has_paper:
      difference = _difference(row, 'best')
      line += [_number(row.paper) or '—',
               '' if difference is None else ('+' if difference >= 0 else '') +
               _number(difference)]
    detail.append(line)
  lines += _markdown_table(header, detail) + ['']
  for row in table.rows:
    if row.kind == 'aggregate' and not row.complete:
      lines.append(f'- {row.label}: not computed, no finished run of '
                   f'{", ".join(row.missing)}.')
  lines += [f'- {note}' for note in table.notes]
  if table.benchmark.name == 'vtab':
    rows = {**paper.VTAB_TABLE_1, **paper.OTHER_VTAB_ROWS}
    others = ', '.join(f'{row.label} ({row.params_m:g}M) '
                       f'{paper.paper_average(table.benchmark, row, "mean_of_group_means"):.1f}' for row in rows.values())
    lines.append(f'- For reference, the paper\'s Table 1, mean of group means: {others}.')
    seeds = ', '.join(f'{label} {value:.1f} ({source})'
                      for label, value, source in paper.SEED_SYSTEM_MEANS.values())
    lines.append(f'- Reported by the seed systems\' own papers (mean of group means, no '
                 f'per-task rows): {seeds}.')
  if table.benchmark.name == 'fgvc':
    means = ', '.join(f'{name} {value}' for name, value in paper.FGVC_MEANS.items())
    lines.append(f'- For reference, the paper\'s FGVC means (its table 2): {means}.')
  return '\n'.join(lines) + '\n'


def markdown(tables: Sequence[Table], problems: Sequence[str] = ()) -> str:
  parts = ['# Results', ''] + [benchmark_markdown(table) for table in tables]
  if problems:
    parts += ['## Workdirs that could not be read (not counted)', '']
    parts += [f'- {problem}' for problem in problems] + ['']
  return '\n'.join(parts)


SUMMARY_FIELDS = ('benchmark', 'row', 'kind', 'group', 'status', 'seeds', 'unfinished_seeds',
                  'setting', 'final_epoch_accuracy_mean_pct', 'final_epoch_accuracy_std_pct',
                  'best_of_evaluations_accuracy_mean_pct', 'best_of_evaluations_accuracy_std_pct',
                  'paper_pct', 'final_epoch_minus_paper_pct',
                  'best_of_evaluations_minus_paper_pct', 'std_note')
RUN_FIELDS = ('benchmark', 'task', 'seed', 'final_epoch_accuracy_pct',
              'best_of_evaluations_accuracy_pct', 'best_of_evaluations_epoch', 'epochs',
              'method', 'model', 'num_eval', 'drop_rate', 'coeff_init', 'workdir')


def summary_records(table: Table) -> list[dict[str, object]]:
  """One CSV record per row of `table` (empty cells for what is missing)."""
  records = []
  for row in table.rows:
    final, best = row.final, row.best
    records.append({
        'benchmark': table.benchmark.name, 'row': row.name, 'kind': row.kind,
        'group': row.group, 'status': _status(row),
        'seeds': ' '.join(map(str, final.seeds)) if final else '',
        'unfinished_seeds': ' '.join(map(str, row.unfinished_seeds)),
        'setting': row.setting,
        'final_epoch_accuracy_mean_pct': final.mean if final else '',
        'final_epoch_accuracy_std_pct': '' if not final or final.std is None else final.std,
        'best_of_evaluations_accuracy_mean_pct': best.mean if best else '',
        'best_of_evaluations_accuracy_std_pct': '' if not best or best.std is None else best.std,
        'paper_pct': '' if row.paper is None else row.paper,
        'final_epoch_minus_paper_pct': _or_empty(_difference(row, 'final')),
        'best_of_evaluations_minus_paper_pct': _or_empty(_difference(row, 'best')),
        'std_note': row.std_note,
    })
  return records


def _or_empty(value: float | None) -> object:
  return '' if value is None else value


def write_csv(path: str, fields: Sequence[str], records: Sequence[dict]) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(records)


def plot(table: Table, path: str) -> None:
  """Grouped bars per task and average: ours (final epoch, best of evaluations, with
  std error bars) and the paper's; a missing value gets no bar and a label."""
  try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
  except ImportError:
    raise RuntimeError('The bar plot needs matplotlib (pip install matplotlib), or pass '
                       '--noplot.') from None
  import numpy as np

  rows = table.rows
  series = [(f'ours, {METRIC_LABELS["final"]}', 'final', '#1f77b4'),
            (f'ours, {METRIC_LABELS["best"]}', 'best', '#ff7f0e')]
  with_paper = any(row.paper is not None for row in rows)
  width = 0.8 / (len(series) + with_paper)
  x = np.arange(len(rows))
  figure = Figure(figsize=(max(6.0, 0.55 * len(rows) + 2), 4.8))
  FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  for index, (label, key, colour) in enumerate(series):
    stats = [getattr(row, key) for row in rows]
    means = [np.nan if s is None else s.mean for s in stats]
    errors = [0.0 if s is None or s.std is None else s.std for s in stats]
    axes.bar(x + (index - 0.5 * (len(series) + with_paper - 1)) * width, means, width,
             yerr=errors, capsize=2, label=label, color=colour)
  if with_paper:
    axes.bar(x + 0.5 * (len(series) + with_paper - 1) * width,
             [np.nan if row.paper is None else row.paper for row in rows], width,
             label=table.paper_label, color='#7f7f7f')
  for position, row in zip(x, rows):
    if not row.complete:
      axes.text(position, 1, MISSING if row.kind == 'task' else INCOMPLETE, rotation=90,
                ha='center', va='bottom', fontsize=7, color='#d62728')
  first_average = next((i for i, row in enumerate(rows) if row.kind == 'aggregate'), None)
  if first_average:
    axes.axvline(first_average - 0.5, color='#999999', linestyle='--', linewidth=0.8)
  axes.set_xticks(x, [row.short for row in rows], rotation=60, ha='right', fontsize=8)
  axes.set_ylabel('test accuracy (%)')
  axes.set_ylim(0, 100)
  axes.set_title(f'{table.benchmark.title}: mean over seeds, error bars = sample std')
  axes.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.0, 1.0))
  figure.tight_layout()
  figure.savefig(path, dpi=120)


def write_report(tables: Sequence[Table], out: str, problems: Sequence[str] = (),
                 plot_figures: bool = True) -> list[str]:
  """report.md, summary.csv (every row of every table), runs.csv (every finished run) and
  <benchmark>.png in `out`; returns the paths written."""
  os.makedirs(out, exist_ok=True)
  paths = [os.path.join(out, name) for name in (REPORT_MD, SUMMARY_CSV, RUNS_CSV)]
  with open(paths[0], 'w') as f:
    f.write(markdown(tables, problems))
  write_csv(paths[1], SUMMARY_FIELDS, [r for table in tables for r in summary_records(table)])
  write_csv(paths[2], RUN_FIELDS, [
      {'benchmark': run.benchmark, 'task': run.task, 'seed': run.seed,
       'final_epoch_accuracy_pct': 100 * run.final_epoch_accuracy,
       'best_of_evaluations_accuracy_pct': 100 * run.best_of_evaluations_accuracy,
       'best_of_evaluations_epoch': run.best_of_evaluations_epoch, 'epochs': run.epochs,
       'method': run.method, 'model': run.model, 'num_eval': run.num_eval,
       'drop_rate': run.drop_rate, 'coeff_init': run.coeff_init, 'workdir': run.workdir}
      for table in tables for run in table.runs])
  if plot_figures:
    for table in tables:
      paths.append(os.path.join(out, f'{table.benchmark.name}.png'))
      plot(table, paths[-1])
  return paths
