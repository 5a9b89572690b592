// The loss-curve plot of a run: train loss per step and validation loss at evaluations, rendered headless from a
// Vega-Lite spec to SVG (vega's SVG renderer needs no canvas) and to PNG with resvg.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { MetricRecord } from '../train/metrics.ts';

export interface PlotPoint {
  step: number;
  loss: number;
  series: string;
}

export function lossPoints(history: MetricRecord[]): PlotPoint[] {
  const pts: PlotPoint[] = [];
  for (const r of history) {
    if (r.kind === 'train' && Number.isFinite(r.loss)) pts.push({ step: r.step, loss: r.loss, series: 'train' });
    if (r.kind === 'eval' && Number.isFinite(r.valLoss)) pts.push({ step: r.step, loss: r.valLoss, series: 'validation' });
  }
  return pts;
}

export function lossCurveSpec(points: PlotPoint[], title = 'QA-LoRA fine-tuning'): Record<string, unknown> {
  return {
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    title,
    width: 560,
    height: 300,
    background: 'white',
    data: { values: points },
    mark: { type: 'line', point: { size: 12 }, strokeWidth: 1.5 },
    encoding: {
      x: { field: 'step', type: 'quantitative', title: 'step' },
      y: { field: 'loss', type: 'quantitative', title: 'cross-entropy (nats/token)', scale: { zero: false } },
      color: { field: 'series', type: 'nominal', title: null, scale: { domain: ['train', 'validation'], range: ['#4c78a8', '#e45756'] } },
    },
  };
}

/** SVG text of a Vega-Lite spec. */
export async function renderSvg(vlSpec: Record<string, unknown>): Promise<string> {
  const vl = await import('vega-lite');
  const vega = await import('vega');
  const compiled = vl.compile(vlSpec as never).spec;
  const view = new vega.View(vega.parse(compiled), { renderer: 'none' });
  try {
    return await view.toSVG();
  } finally {
    view.finalize();
  }
}

export async function svgToPng(svg: string): Promise<Uint8Array> {
  const { Resvg } = await import('@resvg/resvg-js');
  // System fonts make the text render; without them labels are dropped but the curves still show.
  const r = new Resvg(svg, { background: 'white', font: { loadSystemFonts: true, defaultFontFamily: 'DejaVu Sans' } });
  return r.render().asPng();
}

/** Writes loss.svg and loss.png into the run directory; returns their paths (none when there is nothing to plot). */
export async function writeLossPlots(dir: string, history: MetricRecord[]): Promise<string[]> {
  const pts = lossPoints(history);
  if (pts.length === 0) return [];
  const svg = await renderSvg(lossCurveSpec(pts));
  const svgPath = join(dir, 'loss.svg'), pngPath = join(dir, 'loss.png');
  writeFileSync(svgPath, svg);
  writeFileSync(pngPath, await svgToPng(svg));
  return [svgPath, pngPath];
}
