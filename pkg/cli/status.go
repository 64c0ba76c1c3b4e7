package cli

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/duet-ha/duet/pkg/latency"
	"github.com/duet-ha/duet/pkg/node"
	"github.com/spf13/cobra"
)

func newStatus(s IOStreams) *cobra.Command {
	var output string
	var sock func() (string, error)
	var waitSync, watch time.Duration
	var showLatency bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the daemon's role, capture hooks and replication state",
		Example: `  duet status
  duet status --output json
  duet status --wait-sync 60s   # wait until every change is on the peer
  duet status --watch 1s        # redraw every second (resync progress); Ctrl-C ends
  duet status --latency         # where durability calls spend their time, since start
  duet status --latency --watch 10s  # the same for each 10 s`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output != "text" && output != "json" {
				return fmt.Errorf("--output %q: want text or json", output)
			}
			socket, err := sock()
			if err != nil {
				return err
			}
			st, err := node.Query(socket)
			if err != nil {
				return err
			}
			if showLatency {
				return printLatencies(s.Out, socket, &st, output, watch)
			}
			if watch > 0 {
				for {
					if output == "text" && isTerminal(s.Out) {
						fmt.Fprint(s.Out, "\033[H\033[2J")
					}
					if output == "text" {
						fmt.Fprintf(s.Out, "%s\n", time.Now().Format(time.TimeOnly))
					}
					if err := printStatus(s.Out, &st, output); err != nil {
						return err
					}
					time.Sleep(watch)
					if st, err = node.Query(socket); err != nil {
						return err
					}
				}
			}
			if waitSync > 0 {
				deadline := time.Now().Add(waitSync)
				// In sync twice in a row, 50ms apart: a single sample can
				// fall between a record's arrival and its journaling. On
				// the primary, in sync means the peer is SECOND and every
				// change made before the check is durable on it (the
				// barrier a durability call waits on): under a steady
				// write load nothing is ever idle, so "nothing queued"
				// might never be seen.
				for streak := 0; streak < 2; {
					switch {
					case st.State == "PRIM" && st.PeerState.State == "SECOND" && shippedAll(socket, deadline):
						streak = 2
					case st.InSync:
						streak++
					default:
						streak = 0
					}
					if streak == 2 {
						break
					}
					if time.Now().After(deadline) {
						printStatus(s.Out, &st, output)
						return &ExitError{Code: 1, Err: fmt.Errorf("not in sync after %s", waitSync)}
					}
					time.Sleep(50 * time.Millisecond)
					if st, err = node.Query(socket); err != nil {
						return err
					}
				}
			}
			return printStatus(s.Out, &st, output)
		},
	}
	sock = socketFlags(cmd)
	cmd.Flags().StringVarP(&output, "output", "o", "text", "text or json")
	cmd.Flags().DurationVar(&waitSync, "wait-sync", 0, "wait up to this long for everything to be on the peer; exit 1 if not")
	cmd.Flags().DurationVar(&watch, "watch", 0, "print the status again at this interval until interrupted")
	cmd.Flags().BoolVar(&showLatency, "latency", false, "show how long each stage of a durability call takes (p50/p90/p99); with --watch, per interval")
	return cmd
}

// printLatencies prints the stages of durability calls: since the daemon
// started, or with watch > 0 for each interval until interrupted.
func printLatencies(w io.Writer, socket string, st *node.Status, output string, watch time.Duration) error {
	if watch == 0 {
		return printLatency(w, st.Latency, nil, output)
	}
	for {
		prev := st.Latency
		time.Sleep(watch)
		next, err := node.Query(socket)
		if err != nil {
			return err
		}
		if output == "text" {
			fmt.Fprintf(w, "%s, last %s\n", time.Now().Format(time.TimeOnly), watch)
		}
		if err := printLatency(w, next.Latency, prev, output); err != nil {
			return err
		}
		st = &next
	}
}

// stageRow is one stage's figures since a snapshot.
type stageRow struct {
	Stage string  `json:"stage"`
	Count uint64  `json:"count"`
	P50us float64 `json:"p50_us"`
	P90us float64 `json:"p90_us"`
	P99us float64 `json:"p99_us"`
}

// printLatency prints each stage's quantiles over what it counted since
// prev (nil: since start).
func printLatency(w io.Writer, cur, prev []latency.StageCounts, output string) error {
	var rows []stageRow
	for _, sc := range cur {
		c := sc.Counts
		for _, p := range prev {
			if p.Stage == sc.Stage {
				c = c.Minus(p.Counts)
			}
		}
		us := func(q float64) float64 { return float64(c.Quantile(q).Nanoseconds()) / 1000 }
		rows = append(rows, stageRow{Stage: sc.Stage, Count: c.Total(), P50us: us(0.5), P90us: us(0.9), P99us: us(0.99)})
	}
	if output == "json" {
		return json.NewEncoder(w).Encode(rows)
	}
	if len(rows) == 0 {
		fmt.Fprintln(w, "no durability call timed yet")
		return nil
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "stage\tcalls\tp50 µs\tp90 µs\tp99 µs\t")
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%d\t%.0f\t%.0f\t%.0f\t\n", r.Stage, r.Count, r.P50us, r.P90us, r.P99us)
	}
	tw.Flush()
	fmt.Fprintln(w, "(a bucket's upper bound, within 9 %; stages overlap: local_flush runs beside the barrier, apply and flush are on the secondary, within peer)")
	return nil
}

func printStatus(w io.Writer, st *node.Status, output string) error {
	if output == "json" {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}
	yes := map[bool]string{true: "yes", false: "no"}
	stale := ""
	switch {
	case st.Stale:
		stale = " (copy may be stale)"
	case st.HandedOver:
		stale = " (handed the role over: takes nothing over until the peer is heard, or `duet prim --force`)"
	}
	if st.WaitingForPeer != "" {
		stale = " (WAITING: " + st.WaitingForPeer + ")"
	}
	fmt.Fprintf(w, "node %s  state %s  epoch %d%s  in sync: %s  version %s\n", st.Node, st.State, st.Epoch, stale, yes[st.InSync], st.Version)
	if st.ServiceFailed {
		fmt.Fprintln(w, "a service failed here and the role moved to the peer: it does not come back on its own (failback, the peer's own failed service) until `duet swap`, or `duet stop` and `duet start` here, after the service is mended")
	}
	if st.ServiceDown != "" {
		msg := "no peer in sync could take it; it moves to the peer by itself once the peer is SECOND in sync"
		if st.PeerState.ServiceFailed {
			msg = "a service failed on the peer too, before it handed the role here; mend it there, then `duet swap` here, or `duet stop` and `duet start` there (the role then moves by itself once it is SECOND in sync)"
		}
		fmt.Fprintf(w, "a service failed here (%s) and this node kept the role: %s\n", st.ServiceDown, msg)
	}
	p := st.PeerState
	switch {
	case p.Seen:
		fmt.Fprintf(w, "peer %s (%s): %s, epoch %d, last heartbeat %.0f ms ago\n", p.Name, st.Peer, p.State, p.Epoch, p.LastHeartbeat)
	case p.Name != "":
		fmt.Fprintf(w, "peer %s (%s): LOST (last seen %s, %.1f s ago)\n", p.Name, st.Peer, p.State, p.LastHeartbeat/1000)
	default:
		fmt.Fprintf(w, "peer %s: not seen since start\n", st.Peer)
	}
	if p.Refused > 0 {
		fmt.Fprintf(w, "  %d heartbeats refused (wrong key or sender; see the log)\n", p.Refused)
	}
	if v := st.VIP; v != nil {
		where := "not here"
		if v.Held {
			where = "held here"
		}
		fmt.Fprintf(w, "vip %s on %s: %s\n", v.Address, v.Interface, where)
	}
	if st.Module != "" {
		fmt.Fprintf(w, "module %s\n", st.Module)
	}
	if st.EventHook != "" {
		fmt.Fprintf(w, "hook %s\n", st.EventHook)
	}
	if st.LostPeer != "" {
		fmt.Fprintf(w, "lost peer %s\n", st.LostPeer)
	}
	for _, sv := range st.Services {
		health := "healthy"
		if !sv.Healthy {
			health = "FAILING: " + sv.Error
		}
		fmt.Fprintf(w, "service %s: pid %d, %s, %d restarts\n", sv.Name, sv.Pid, health, sv.Restarts)
	}
	if len(st.Dirs) > 0 {
		fmt.Fprintf(w, "replication lag (RPO): %.1f ms, %s unacknowledged", st.LagMs, bytesOf(uint64(st.LagBytes)))
		if n := st.LagHistogram.Total(); n > 0 {
			fmt.Fprintf(w, "; p99 %s over %d batches", bound(st.LagHistogram.Quantile(0.99, node.Histogram{})), n)
		}
		fmt.Fprintln(w)
		if n := st.BarrierHistogram.Total(); n > 0 {
			fmt.Fprintf(w, "durability calls held for the peer: %d, p50 %s, p99 %s\n", n,
				bound(st.BarrierHistogram.Quantile(0.5, node.Histogram{})), bound(st.BarrierHistogram.Quantile(0.99, node.Histogram{})))
		}
	}
	if len(st.Hooks) > 0 {
		var on, off []string
		for _, h := range st.Hooks {
			if h.Active {
				on = append(on, h.Type+"/"+h.Name)
			} else {
				off = append(off, h.Name+" ("+h.Error+")")
			}
		}
		fmt.Fprintf(w, "capture hooks: %s\n", strings.Join(on, " "))
		if len(off) > 0 {
			fmt.Fprintf(w, "unavailable hooks: %s\n", strings.Join(off, "; "))
		}
	}
	if st.Capture != nil {
		fmt.Fprintf(w, "capture: %d records, %d lost, ring buffer %s waiting\n", st.Capture.Seq, st.Capture.Lost, bytesOf(uint64(st.RingBytes)))
	}
	for _, d := range st.Dirs {
		conn := "connected"
		if !d.Connected {
			conn = "DISCONNECTED"
		}
		mode := d.Mode
		if d.MaxLagMs > 0 {
			mode += fmt.Sprintf(" (max lag %g ms)", d.MaxLagMs)
		}
		fmt.Fprintf(w, "dir %s (%s) -> %s, %s: %s, batches %d built / %d acked, %d files pending, lag %.1f ms\n",
			d.Dir, d.Path, d.Peer, mode, conn, d.Sent, d.Acked, d.PendingFiles, d.LagMs)
		fmt.Fprintf(w, "  changed %s, read %s, on the wire %s, full syncs %d\n",
			bytesOf(d.ChangedBytes), bytesOf(d.DataBytes), bytesOf(d.WireBytes), d.FullSyncs)
		if d.Barriers > 0 {
			fmt.Fprintf(w, "  barriers (duet exec fsyncs) %d, %.2f ms on average\n", d.Barriers, d.BarrierAvgMs)
		}
		trusted := "trusted"
		if !d.BitmapTrusted {
			trusted = "not trusted (a crash or lost records): files changed since the sync point are compared"
		}
		fmt.Fprintf(w, "  modification bitmap: %s in %d files, %s\n", bytesOf(d.BitmapBytes), d.BitmapFiles, trusted)
		if r := d.Resync; r.Active {
			fmt.Fprintf(w, "  resync: %s\n", progressLine(d.Dir, &r, d.Connected))
		} else if r.Mode != "" && !r.Ended.IsZero() {
			fmt.Fprintf(w, "  last resync (%s) at %s: %d of %d files compared, %d sent, %s in %s\n", r.Mode,
				r.Ended.Format(time.RFC3339), r.FilesCompared, r.FilesTotal, r.FilesSent, bytesOf(r.BytesSent),
				r.Ended.Sub(r.Started).Round(time.Millisecond))
		}
		if d.LastError != "" {
			fmt.Fprintf(w, "  last error (%s): %s\n", d.LastErrorAt, d.LastError)
		}
		if d.PeerCannotApply != "" {
			fmt.Fprintf(w, "  PEER CANNOT APPLY: %s (durability calls go on without it; retried with backoff)\n", d.PeerCannotApply)
		}
		if d.StuckMarks > 0 {
			fmt.Fprintf(w, "  CAPTURE MARKS FOUND STUCK on %d files (a bug: their changes were not captured for a while; each was rescanned and sent again; please report it with the log)\n", d.StuckMarks)
		}
		if d.DivergedResyncs > 0 {
			fmt.Fprintf(w, "  the peer's copy did not fit a batch %d times: each time every file was compared with it (see the log)\n", d.DivergedResyncs)
		}
		if d.DroppedChanges > 0 {
			fmt.Fprintf(w, "  %d changes could not be shipped after retries: each started a resync of its file (see the log)\n", d.DroppedChanges)
		}
	}
	for _, c := range st.Copies {
		var flags []string
		if c.Source {
			flags = append(flags, "source")
		}
		if !c.Consistent {
			flags = append(flags, "INCONSISTENT (a resync into it was cut short)")
		}
		if c.Crashed {
			flags = append(flags, "crashed (not cleanly stopped, or its disk failed: compared at its next resync)")
		}
		if c.DiskFailed != "" {
			flags = append(flags, "DISK FAILED: "+c.DiskFailed)
		}
		sp := c.SyncPoint
		if sp == "" {
			sp = "none yet"
		}
		fmt.Fprintf(w, "copy %s: generation %s, sync point %s %s\n", c.Dir, c.Gen, sp, strings.Join(flags, ", "))
	}
	for _, r := range st.Replicas {
		conn := "connected to " + r.Peer
		if !r.Connected {
			conn = "no primary connected"
		}
		fmt.Fprintf(w, "replica %s (%s): %s, %d batches / %d ops applied, last batch %d\n",
			r.Dir, r.Path, conn, r.Batches, r.Ops, r.LastSeq)
		if r.Batches > 0 {
			fmt.Fprintf(w, "  apply %.2f ms per batch; %d syncs to disk, %.2f ms each\n", r.ApplyAvgMs, r.Syncs, r.SyncAvgMs)
		}
		if r.LastError != "" {
			fmt.Fprintf(w, "  last error: %s\n", r.LastError)
		}
	}
	return nil
}

func bytesOf(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// bound prints a histogram quantile: an upper bound, in ms.
func bound(ms float64) string {
	if math.IsInf(ms, 1) {
		return "over 5 s"
	}
	return fmt.Sprintf("≤ %g ms", ms)
}

// shippedAll runs one barrier through the daemon at socket: true when
// every change made before it is durable on the peer ("ok"; "alone" means
// it was released without the peer), answered before deadline.
func shippedAll(socket string, deadline time.Time) bool {
	c, err := net.DialTimeout("unix", socket, 2*time.Second)
	if err != nil {
		return false
	}
	defer c.Close()
	c.SetDeadline(deadline)
	if _, err := c.Write([]byte("barrier\n")); err != nil {
		return false
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	return err == nil && strings.TrimSpace(line) == "ok"
}
