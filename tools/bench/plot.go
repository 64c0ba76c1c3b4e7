package main

import (
	"fmt"
	"image/color"
	"math"
	"os"
	"path/filepath"
	"sort"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
)

// plots holds what the figures collected for drawing.
type plots struct {
	// latency samples (ms) by series name, for the distribution plot
	latency map[string][]float64
	// bars: one chart per title, a value per label (in order)
	bars []barChart
	// lag histogram of the async run: bucket bounds (ms) and counts
	lagBounds []float64
	lagCounts []uint64
	// the replication lag sampled over time during the async run
	lagSeries []lagSample
}

type lagSample struct{ sec, ms float64 }

type barChart struct {
	file, title, unit string
	labels            []string
	values            []float64
}

func (p *plots) addLatency(series string, samples []float64) {
	if p.latency == nil {
		p.latency = map[string][]float64{}
	}
	p.latency[series] = append(p.latency[series], samples...)
}

// write draws every plot as a PNG into dir and returns the files written.
func (p *plots) write(dir string) ([]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	var files []string
	if len(p.latency) > 0 {
		f := filepath.Join(dir, "latency-cdf.png")
		if err := p.latencyCDF(f); err != nil {
			return files, err
		}
		files = append(files, f)
	}
	for _, b := range p.bars {
		f := filepath.Join(dir, b.file)
		if err := b.draw(f); err != nil {
			return files, err
		}
		files = append(files, f)
	}
	if len(p.lagCounts) > 0 {
		f := filepath.Join(dir, "async-lag.png")
		var labels []string
		var values []float64
		for i, c := range p.lagCounts {
			if i < len(p.lagBounds) {
				labels = append(labels, fmt.Sprintf("≤%g", p.lagBounds[i]))
			} else {
				labels = append(labels, "more")
			}
			values = append(values, float64(c))
		}
		// Only up to the last non-empty bucket.
		last := 0
		for i, v := range values {
			if v > 0 {
				last = i
			}
		}
		b := barChart{title: "async replication lag per acknowledged batch (20 MB/s writer)", unit: "batches",
			labels: labels[:last+1], values: values[:last+1]}
		if err := b.draw(f); err != nil {
			return files, err
		}
		files = append(files, f)
	}
	if len(p.lagSeries) > 0 {
		f := filepath.Join(dir, "lag-over-time.png")
		if err := p.lagOverTime(f); err != nil {
			return files, err
		}
		files = append(files, f)
	}
	return files, nil
}

// lagOverTime draws the replication lag the status reported while the
// steady writer ran.
func (p *plots) lagOverTime(file string) error {
	pl := plot.New()
	pl.Title.Text = "replication lag over time (unsupervised 20 MB/s writer, duet status every 250 ms)"
	pl.X.Label.Text = "seconds since the writer started"
	pl.Y.Label.Text = "lag (ms)"
	pts := make(plotter.XYs, len(p.lagSeries))
	for i, s := range p.lagSeries {
		pts[i] = plotter.XY{X: s.sec, Y: s.ms}
	}
	line, err := plotter.NewLine(pts)
	if err != nil {
		return err
	}
	line.Color = plotutil.Color(2) // blue, apart from the red target
	line.Width = vg.Points(1.5)
	pl.Add(line)
	target, err := plotter.NewLine(plotter.XYs{{X: 0, Y: 50}, {X: pts[len(pts)-1].X, Y: 50}})
	if err != nil {
		return err
	}
	target.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
	target.Color = color.RGBA{R: 200, A: 255}
	pl.Add(target)
	pl.Legend.Add("lag", line)
	pl.Legend.Add("50 ms target (p99)", target)
	// The legend goes above the target line, clear of the samples.
	pl.Legend.Top = true
	pl.Y.Min, pl.Y.Max = 0, 70
	for _, xy := range pts {
		pl.Y.Max = max(pl.Y.Max, xy.Y*1.1)
	}
	pl.Add(plotter.NewGrid())
	return pl.Save(7*vg.Inch, 4*vg.Inch, file)
}

// latencyCDF draws the distribution of per-call latencies of each series.
func (p *plots) latencyCDF(file string) error {
	pl := plot.New()
	pl.Title.Text = "4 KiB random write + fdatasync: latency distribution"
	pl.X.Label.Text = "latency (ms, log scale)"
	pl.Y.Label.Text = "fraction of calls at or below"
	pl.X.Scale = plot.LogScale{}
	pl.X.Tick.Marker = plot.LogTicks{Prec: -1}
	names := make([]string, 0, len(p.latency))
	for n := range p.latency {
		names = append(names, n)
	}
	sort.Strings(names)
	for i, n := range names {
		s := append([]float64(nil), p.latency[n]...)
		sort.Float64s(s)
		pts := make(plotter.XYs, 0, len(s))
		for j, v := range s {
			pts = append(pts, plotter.XY{X: math.Max(v, 0.001), Y: float64(j+1) / float64(len(s))})
		}
		line, err := plotter.NewLine(pts)
		if err != nil {
			return err
		}
		line.Color = plotutil.Color(i)
		line.Width = vg.Points(1.5)
		pl.Add(line)
		pl.Legend.Add(n, line)
	}
	pl.Legend.Top, pl.Legend.Left = false, false
	pl.Legend.XOffs = vg.Points(-10)
	pl.Legend.YOffs = vg.Points(10)
	pl.Add(plotter.NewGrid())
	return pl.Save(7*vg.Inch, 4.5*vg.Inch, file)
}

func (b *barChart) draw(file string) error {
	pl := plot.New()
	pl.Title.Text = b.title
	pl.Y.Label.Text = b.unit
	bars, err := plotter.NewBarChart(plotter.Values(b.values), vg.Points(28))
	if err != nil {
		return err
	}
	bars.Color = color.RGBA{R: 60, G: 110, B: 180, A: 255}
	bars.LineStyle.Width = 0
	pl.Add(bars)
	pl.NominalX(b.labels...)
	pl.Add(plotter.NewGrid())
	w := vg.Length(math.Max(5, float64(len(b.labels))*1.7)) * vg.Inch
	return pl.Save(w, 4*vg.Inch, file)
}
