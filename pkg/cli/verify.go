package cli

import (
	"context"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/duet-ha/duet/pkg/config"
	"github.com/duet-ha/duet/pkg/fstree"
	"github.com/duet-ha/duet/pkg/peerlink"
	"github.com/duet-ha/duet/pkg/replica"
	"github.com/duet-ha/duet/pkg/wire"
	"github.com/spf13/cobra"
)

func newVerify(s IOStreams) *cobra.Command {
	var cfgPath, only string
	var timeout time.Duration
	var quiet bool
	cmd := &cobra.Command{
		Use:   "verify",
		Short: "Compare this node's copy with the peer's by checksum",
		Long: `verify scans the replicated directories here and asks the peer's daemon for
its own scan, then prints every difference: entries on one side only, type,
permissions, owner, size, symlink target and content (64 KiB block checksums).
Exit code 0 when identical, 1 when they differ, 2 on error. Run it when the
writers are quiet (see duet status --wait-sync), or it reports work in flight.

While both sides scan, verify shows their progress on stderr: entries and
bytes scanned here and received from the peer, and elapsed time. The peer
sends no total: once one scan is done, its count is the estimate (≈) of the
other's. On a terminal it is a bar per directory, otherwise a line every
few seconds; --quiet turns it off. Differences and the result go to stdout.`,
		Example: `  duet verify --config /etc/duet/duet.yaml
  duet verify --dir mysql
  duet verify --quiet > differences.txt`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadConfig(cfgPath, false)
			if err != nil {
				return err
			}
			keys, err := cfg.ReadKeys()
			if err != nil {
				return err
			}
			lk, err := peerlink.New(peerlink.Options{Node: cfg.Node, Keys: keys, Plaintext: cfg.InsecurePlaintextLink})
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			total, found := 0, false
			for _, r := range cfg.Replicate {
				if only != "" && r.Name != only {
					continue
				}
				found = true
				n, err := verifyDir(ctx, s, lk, cfg.Peer, r, !quiet)
				if err != nil {
					return err
				}
				total += n
			}
			if !found {
				return fmt.Errorf("--dir %q: no such replicated directory in %s", only, cfgPath)
			}
			if total > 0 {
				return &ExitError{Code: 1, Err: fmt.Errorf("%d differences", total)}
			}
			return nil
		},
	}
	cmd.Flags().StringVarP(&cfgPath, "config", "c", "/etc/duet/duet.yaml", "configuration file")
	cmd.Flags().StringVar(&only, "dir", "", "verify only this replicated directory (by name)")
	cmd.Flags().DurationVar(&timeout, "timeout", 10*time.Minute, "give up after this long")
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "show no progress on stderr")
	return cmd
}

// verifyDir compares directory r with the peer's copy and prints the
// differences; with show, the progress of both scans while they run.
func verifyDir(ctx context.Context, s IOStreams, lk *peerlink.Link, peer string, r config.Replicate, show bool) (int, error) {
	root, err := fstree.OpenRoot(r.Path)
	if err != nil {
		return 0, err
	}
	defer root.Close()
	sc := &scans{}
	stop := func(bool) {}
	if show {
		stop = showScans(s.Err, r.Name, sc, scanLineEvery)
	}
	// Both sides read their whole tree: let them do it at the same time.
	type manifest struct {
		entries []wire.Entry
		err     error
	}
	peerc := make(chan manifest, 1)
	go func() {
		es, err := replica.FetchManifest(ctx, lk, peer, r.Name, sc.peerAt)
		if err == nil {
			sc.peerDone()
		}
		peerc <- manifest{es, err}
	}()
	local, tooLong, lerr := fstree.Collect(func(fn func(*wire.Entry) error) (int, error) {
		return fstree.Walk(root, true, func(e *wire.Entry) error {
			sc.localAdd(e.Size)
			return fn(e)
		})
	})
	if lerr != nil {
		stop(false)
		return 0, fmt.Errorf("scanning %s: %w", r.Path, lerr)
	}
	sc.localDone()
	m := <-peerc
	stop(m.err == nil)
	if tooLong > 0 {
		fmt.Fprintf(s.Err, "%s: %d entries not compared: their paths are longer than %d bytes, which duet does not replicate\n", r.Name, tooLong, wire.MaxPath)
	}
	if m.err != nil {
		return 0, fmt.Errorf("asking %s for its copy of %q: %w", peer, r.Name, m.err)
	}
	remote := m.entries
	diffs := fstree.Compare(local, remote)
	for _, d := range diffs {
		fmt.Fprintf(s.Out, "%s: %q: %s\n", r.Name, d.Path, d.What)
	}
	var bytes uint64
	for _, e := range local {
		bytes += e.Size
	}
	if len(diffs) == 0 {
		fmt.Fprintf(s.Out, "%s: identical (%d entries, %s compared with %s)\n", r.Name, len(local), bytesOf(bytes), peer)
	}
	return len(diffs), nil
}

// scanCount is one side's scan of a directory so far.
type scanCount struct {
	entries int
	bytes   uint64 // the sum of the entries' sizes
	done    bool
}

// scans counts a directory's two scans as they run: the local one as
// verifyDir walks, the peer's as its manifest arrives; the display reads
// them from its own goroutine.
type scans struct {
	mu          sync.Mutex
	local, peer scanCount
}

func (s *scans) localAdd(size uint64) {
	s.mu.Lock()
	s.local.entries++
	s.local.bytes += size
	s.mu.Unlock()
}

func (s *scans) localDone() {
	s.mu.Lock()
	s.local.done = true
	s.mu.Unlock()
}

// peerAt is replica.FetchManifest's progress callback.
func (s *scans) peerAt(entries int, bytes uint64) {
	s.mu.Lock()
	s.peer.entries, s.peer.bytes = entries, bytes
	s.mu.Unlock()
}

func (s *scans) peerDone() {
	s.mu.Lock()
	s.peer.done = true
	s.mu.Unlock()
}

func (s *scans) get() (local, peer scanCount) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.local, s.peer
}

// scanLineEvery is how often verify prints its progress when stderr is
// not a terminal: often enough to show it is alive, seldom enough for a log.
const scanLineEvery = 5 * time.Second

// showScans shows sc's progress on w until the returned stop is called: a
// bar for dir on a terminal, otherwise a line every lineEvery. stop
// completes the bar (done) or drops it, and returns once it is drawn.
func showScans(w io.Writer, dir string, sc *scans, lineEvery time.Duration) (stop func(done bool)) {
	start := time.Now()
	var bars *progressBars
	every := lineEvery
	if isTerminal(w) {
		bars = newProgressBars(w, 0)
		every = 250 * time.Millisecond
	}
	draw := func() {
		local, peer := sc.get()
		frac, text := scansProgress(local, peer, time.Since(start))
		if bars != nil {
			bars.set(dir, frac, text)
			return
		}
		fmt.Fprintf(w, "verify %s: %s\n", dir, text)
	}
	quit, drawn := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(drawn)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-quit:
				return
			case <-t.C:
				draw()
			}
		}
	}()
	return func(done bool) {
		close(quit)
		<-drawn
		if bars != nil {
			draw() // the final counts stay on the screen
			bars.end(done)
		}
	}
}

// scansProgress is what verify shows of a directory's two scans after
// elapsed: the fraction done and the text beside the bar. The peer sends
// no total, and neither side knows its own before it ends: the first scan
// done gives the estimate (≈) of the other's, and before that there are
// counts only (fraction 0).
func scansProgress(local, peer scanCount, elapsed time.Duration) (float64, string) {
	frac := 0.0
	switch {
	case local.done && peer.done:
		frac = 1
	case local.done && local.entries > 0:
		frac = min(1, float64(peer.entries)/float64(local.entries))
	case peer.done && peer.entries > 0:
		frac = min(1, float64(local.entries)/float64(peer.entries))
	}
	return frac, fmt.Sprintf("local %s; peer %s; %s", scanText(local, peer), scanText(peer, local), elapsed.Round(time.Second))
}

// scanText is one side's counts, c, beside the estimate the other side's
// finished scan gives.
func scanText(c, other scanCount) string {
	switch {
	case c.done:
		return fmt.Sprintf("%d entries, %s, done", c.entries, bytesOf(c.bytes))
	case other.done:
		return fmt.Sprintf("%d of ≈%d entries, %s of ≈%s", c.entries, other.entries, bytesOf(c.bytes), bytesOf(other.bytes))
	}
	return fmt.Sprintf("%d entries, %s", c.entries, bytesOf(c.bytes))
}
