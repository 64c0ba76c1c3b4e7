package node

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/duet-ha/duet/pkg/barrier"
	"github.com/duet-ha/duet/pkg/cluster"
	"github.com/duet-ha/duet/pkg/latency"
)

// The control socket: the line protocol `duet` commands and the
// supervisors speak to the daemon.

func (n *Node) listenControl() (net.Listener, error) {
	os.MkdirAll(filepath.Dir(n.cfg.Socket), 0o700)
	if c, err := net.Dial("unix", n.cfg.Socket); err == nil {
		c.Close()
		return nil, fmt.Errorf("socket %q: another duet daemon is running with it", n.cfg.Socket)
	}
	os.Remove(n.cfg.Socket)
	ln, err := net.Listen("unix", n.cfg.Socket)
	if err != nil {
		return nil, fmt.Errorf("socket %q: %w", n.cfg.Socket, err)
	}
	os.Chmod(n.cfg.Socket, 0o600)
	return ln, nil
}

// Control requests and the cluster events they stand for.
var controlCommands = map[string]cluster.Event{
	"start":      {Kind: cluster.EvCmdStart},
	"stop":       {Kind: cluster.EvCmdStop},
	"prim":       {Kind: cluster.EvCmdPrim},
	"prim-force": {Kind: cluster.EvCmdPrim, Force: true},
	"second":     {Kind: cluster.EvCmdSecond},
	"swap":       {Kind: cluster.EvCmdSwap},
}

func (n *Node) serveControl(ctx context.Context, ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			br := bufio.NewReader(c)
			line, err := br.ReadString('\n')
			if err != nil {
				return
			}
			// A barrier connection's first request may carry timings
			// too: the client's other connections answered calls.
			req := n.barrierReport(strings.TrimSpace(line), -1)
			if ev, ok := controlCommands[req]; ok {
				// Leaving the role may wait for the peer to catch up.
				c.SetDeadline(time.Now().Add(n.barrierTimeout + 30*time.Second))
				fmt.Fprintln(c, n.command(ctx, ev))
				return
			}
			switch req {
			case "resync", "resync-full":
				fmt.Fprintln(c, n.resync(req == "resync-full"))
			case "status":
				json.NewEncoder(c).Encode(n.Status())
			case "barrier":
				// A barrier connection stays open for the next
				// call: a supervised writer's fsyncs skip a
				// connect each. Each request may carry the
				// client's timings of earlier calls.
				c.SetDeadline(time.Time{})
				var took time.Duration // the daemon's part of the last call
				for req == "barrier" && err == nil {
					start := time.Now()
					reply := n.barrier(ctx)
					took = time.Since(start)
					if _, err = fmt.Fprintln(c, reply); err == nil {
						line, err = br.ReadString('\n')
						req = n.barrierReport(strings.TrimSpace(line), took)
					}
				}
			default:
				fmt.Fprintf(c, "{\"error\":%q}\n", "unknown request "+req)
			}
		}()
	}
}

// barrierReport takes the timings a barrier request carries ("barrier
// rtt=N held=N wait=N local=N", nanoseconds, each optional; see
// BarrierClient), counts them, and returns the bare request. rtt is the
// client's round trip of the previous call on this connection, whose
// daemon part was took (negative: no call before on this connection):
// the rest is the control socket's hop.
func (n *Node) barrierReport(line string, took time.Duration) string {
	req, fields, _ := strings.Cut(line, " ")
	if req != "barrier" {
		return line
	}
	for _, f := range strings.Fields(fields) {
		k, v, _ := strings.Cut(f, "=")
		ns, err := strconv.ParseInt(v, 10, 64)
		if err != nil || ns < 0 {
			continue
		}
		d := time.Duration(ns)
		switch k {
		case "rtt":
			if took >= 0 && d >= took {
				n.stages.Observe(latency.ControlHop, d-took)
			}
		case "held":
			n.stages.Observe(latency.Held, d)
		case "local":
			n.stages.Observe(latency.LocalFlush, d)
		}
	}
	return req
}

// observeCall counts the timing of a durability call held by a
// supervisor.
func (n *Node) observeCall(t barrier.Timing) {
	n.stages.Observe(latency.Held, t.Held)
	if t.Local > 0 {
		n.stages.Observe(latency.LocalFlush, t.Local)
	}
}

// resync starts a resync of every directory with the peer: from the
// bitmaps and sync points, or (full) by checksums of every file.
func (n *Node) resync(full bool) string {
	n.smu.RLock()
	primaries := n.primaries
	n.smu.RUnlock()
	if len(primaries) == 0 {
		return "refused: this node does not serve: run duet resync on the primary, which sends its copy"
	}
	for _, p := range primaries {
		p.Resync(full)
	}
	return "ok: resync started"
}

// noDaemon is the error of a command that finds no daemon behind socket,
// with the ways to start one.
func noDaemon(socket string, err error) error {
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("no duet daemon at %s (start it: systemctl start duet, or duet run --config FILE; or name another with --socket or --config): %w", socket, err)
	}
	return fmt.Errorf("no duet daemon at %s: %w", socket, err)
}

// Command sends an operator command (start, stop, prim, prim-force,
// second, swap) to the daemon behind socket and returns its answer.
func Command(socket, req string) (string, error) {
	c, err := net.DialTimeout("unix", socket, 2*time.Second)
	if err != nil {
		return "", noDaemon(socket, err)
	}
	defer c.Close()
	if _, err := fmt.Fprintln(c, req); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("%s: daemon gone: %w", req, err)
	}
	line = strings.TrimSpace(line)
	if !strings.HasPrefix(line, "ok") {
		return "", errors.New(line)
	}
	return line, nil
}
