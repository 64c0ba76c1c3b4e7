package cli

import (
	"io"
	"os"
	"sync"
	"time"

	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
)

// progressBars draws a progress bar per directory on a terminal (mpb),
// with the command's own figures beside it (resync: the daemon's rate and
// ETA; verify: both scans' counts), not ones the bar would guess from how
// often it is fed.
type progressBars struct {
	p    *mpb.Progress
	mu   sync.Mutex
	bars map[string]*mpb.Bar
	text map[string]string
}

// newProgressBars draws on w, lines width wide (0: the terminal's).
func newProgressBars(w io.Writer, width int) *progressBars {
	opts := []mpb.ContainerOption{mpb.WithOutput(w), mpb.WithAutoRefresh(), mpb.WithRefreshRate(250 * time.Millisecond)}
	if width > 0 {
		opts = append(opts, mpb.WithWidth(width))
	}
	return &progressBars{p: mpb.New(opts...), bars: map[string]*mpb.Bar{}, text: map[string]string{}}
}

// barScale is a bar's total: a fraction in thousandths.
const barScale = 1000

// set shows dir at frac, with text beside the bar.
func (b *progressBars) set(dir string, frac float64, text string) {
	b.mu.Lock()
	b.text[dir] = text
	bar := b.bars[dir]
	b.mu.Unlock()
	if bar == nil {
		bar = b.p.AddBar(barScale, mpb.BarWidth(24), mpb.PrependDecorators(decor.Name(dir+" "), decor.Percentage(decor.WCSyncSpace)),
			mpb.AppendDecorators(decor.Any(func(decor.Statistics) string {
				b.mu.Lock()
				defer b.mu.Unlock()
				return " " + b.text[dir]
			})))
		b.mu.Lock()
		b.bars[dir] = bar
		b.mu.Unlock()
	}
	// Not complete before the end: a completed bar stops drawing.
	bar.SetCurrent(min(int64(frac*barScale), barScale-1))
}

// end completes (done) or drops the bars and waits until they are drawn.
func (b *progressBars) end(done bool) {
	b.mu.Lock()
	bars := b.bars
	b.mu.Unlock()
	for _, bar := range bars {
		if done {
			bar.SetCurrent(barScale)
		} else {
			bar.Abort(false)
		}
	}
	b.p.Wait()
}

// isTerminal reports whether w is a character device (a terminal).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}
