package cli

import (
	"fmt"
	"strings"
	"time"

	"github.com/duet-ha/duet/pkg/node"
	"github.com/duet-ha/duet/pkg/replica"
	"github.com/spf13/cobra"
)

func newResync(s IOStreams) *cobra.Command {
	var full, noWait bool
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "resync",
		Short: "Bring the peer's copy level with this one now, showing progress",
		Long: `resync, run on the primary, compares its copy with the peer's and sends what
differs. By default it moves what the modification bitmap and the two copies'
sync points call for (what a returning node gets anyway); --full compares every
file by block checksums, like an initial sync. Capture goes on meanwhile: the
services keep writing. The peer is a mirror again when the command returns.`,
		Example: `  duet resync
  duet resync --full         # compare everything by checksums
  duet resync --no-wait      # start it and return; follow with duet status --watch`,
		Args: cobra.NoArgs,
	}
	sock := socketFlags(cmd)
	cmd.Flags().BoolVar(&full, "full", false, "compare every file by block checksums")
	cmd.Flags().BoolVar(&noWait, "no-wait", false, "return once the resync has started")
	cmd.Flags().DurationVar(&timeout, "timeout", 0, "give up waiting after this long (0: wait until done); exit 1")
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		socket, err := sock()
		if err != nil {
			return err
		}
		req := "resync"
		if full {
			req = "resync-full"
		}
		asked := time.Now()
		reply, err := node.Command(socket, req)
		if err != nil {
			return err
		}
		fmt.Fprintln(s.Out, reply)
		if noWait {
			return nil
		}
		tty := isTerminal(s.Out)
		var bars *progressBars
		if tty {
			bars = newProgressBars(s.Out, 0)
		}
		var lastLine time.Time
		for {
			st, err := node.Query(socket)
			if err != nil {
				return err
			}
			done := len(st.Dirs) > 0
			var lines []string
			for _, d := range st.Dirs {
				r := d.Resync
				if !r.Started.After(asked) || r.Active || !d.InSync {
					done = false
				}
				lines = append(lines, progressLine(d.Dir, &r, d.Connected))
				if bars != nil {
					frac, text := progressOf(&r, d.Connected)
					bars.set(d.Dir, frac, text)
				}
			}
			if done {
				if bars != nil {
					bars.end(true)
				}
				for _, d := range st.Dirs {
					r := d.Resync
					fmt.Fprintf(s.Out, "resync %s: done in %s (%s): %d of %d files compared by checksums, %d files sent, %s sent\n",
						d.Dir, r.Ended.Sub(r.Started).Round(time.Millisecond), r.Mode, r.FilesCompared, r.FilesTotal,
						r.FilesSent, bytesOf(r.BytesSent))
				}
				return nil
			}
			if timeout > 0 && time.Since(asked) > timeout {
				if bars != nil {
					bars.end(false)
				}
				return &ExitError{Code: 1, Err: fmt.Errorf("resync not done after %s", timeout)}
			}
			switch {
			case tty:
			case time.Since(lastLine) >= 5*time.Second:
				lastLine = time.Now()
				fmt.Fprintln(s.Out, strings.Join(lines, " | "))
			}
			time.Sleep(500 * time.Millisecond)
		}
	}
	return cmd
}

// progressLine renders one directory's resync progress on one line (duet
// status, and resync's output when it is not a terminal).
func progressLine(dir string, r *replica.ResyncStatus, connected bool) string {
	frac, text := progressOf(r, connected)
	if !r.Active {
		return dir + ": " + text
	}
	const width = 24
	n := int(frac * width)
	bar := strings.Repeat("#", n) + strings.Repeat(".", width-n)
	return fmt.Sprintf("%s [%s] %3.0f%% %s", dir, bar, frac*100, text)
}

// progressOf is a resync's progress: the part of the planned bytes sent,
// and what to say beside the bar.
func progressOf(r *replica.ResyncStatus, connected bool) (float64, string) {
	if !r.Active {
		if !connected {
			return 0, "waiting for the peer"
		}
		return 0, "starting"
	}
	if r.Phase == replica.PhaseCopying {
		// To an empty peer the tree is sent as it is read: the bytes
		// planned are those read so far, and the total is unknown.
		return 0, fmt.Sprintf("copying to the peer's empty copy: %s sent, %d files read so far (the total is known when the walk ends), %s/s (%s)",
			bytesOf(r.BytesSent), r.FilesTotal, bytesOf(uint64(r.RateBps)), r.Mode)
	}
	frac := 0.0
	if r.BytesPlanned > 0 {
		frac = min(1, float64(r.BytesSent)/float64(r.BytesPlanned))
	}
	if r.Phase == replica.PhaseWaiting {
		frac = 1
	}
	eta := "?"
	if r.EtaSec > 0 {
		eta = (time.Duration(r.EtaSec * float64(time.Second))).Round(time.Second).String()
	} else if frac == 1 {
		eta = "0s"
	}
	return frac, fmt.Sprintf("%s: %s / %s, %d/%d files compared, %s/s, ETA %s (%s)",
		r.Phase, bytesOf(r.BytesSent), bytesOf(r.BytesPlanned), r.FilesCompared, r.FilesTotal,
		bytesOf(uint64(r.RateBps)), eta, r.Mode)
}
