package replica

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/peerlink"
	"github.com/duet-ha/duet/pkg/wire"
)

// BenchmarkLinkTLSCost measures what TLS costs the replication stream, in
// one run: a primary's stream to a real secondary over the loopback, with
// TLS and in plaintext (insecure_plaintext_link). It reports
//
//   - the throughput of 64 KiB sequential writes, shipped asynchronously
//     in 4 MiB batches of incompressible data (as the primary cuts and
//     sends them), until the last is acknowledged as applied;
//   - the median round trip of a 4 KiB write followed by fdatasync: a
//     batch and its sync request in one write (see coalescer), until the
//     durable acknowledgement;
//
// and TLS's ratio to plaintext for each (throughput: <1 is slower;
// latency: >1 is slower). Capture is not part of it: the figures are the
// link's and the applier's. Run with -benchtime=1x (each iteration
// ships 256 MiB per mode).
func BenchmarkLinkTLSCost(b *testing.B) {
	const (
		streamBytes = 256 << 20
		syncs       = 200
	)
	var mbps [2]float64
	var lat [2][]time.Duration
	for range b.N {
		for i, plaintext := range []bool{true, false} {
			r := runLinkBench(b, plaintext, streamBytes, syncs)
			mbps[i] += r.mbps
			lat[i] = append(lat[i], r.syncs...)
		}
	}
	p50 := func(d []time.Duration) time.Duration {
		slices.Sort(d)
		return d[len(d)/2]
	}
	b.ReportMetric(mbps[0]/float64(b.N), "plain-MB/s")
	b.ReportMetric(mbps[1]/float64(b.N), "tls-MB/s")
	b.ReportMetric(mbps[1]/mbps[0], "tls/plain-throughput")
	b.ReportMetric(float64(p50(lat[0]).Microseconds()), "plain-sync-p50-µs")
	b.ReportMetric(float64(p50(lat[1]).Microseconds()), "tls-sync-p50-µs")
	b.ReportMetric(float64(p50(lat[1]))/float64(p50(lat[0])), "tls/plain-sync-p50")
}

type linkBenchResult struct {
	mbps  float64
	syncs []time.Duration
}

func runLinkBench(b *testing.B, plaintext bool, streamBytes, syncs int) linkBenchResult {
	b.Helper()
	lk := newTestLink([]byte("0123456789abcdef"), plaintext)
	sec := newTestSecondaryLink(b, filepath.Join(b.TempDir(), "state"), lk, slog.New(slog.NewTextHandler(io.Discard, nil)))
	var sb [8]byte
	rand.Read(sb[:])
	c, welcome, err := dialPeer(context.Background(), lk, &net.Dialer{}, sec.addr,
		wire.Hello{Purpose: wire.PurposeReplicate, Session: binary.LittleEndian.Uint64(sb[:]) | 1, Dir: "data"})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Time{})
	br := bufio.NewReader(c)
	w := &coalescer{c: c}

	// The stream: 64 KiB writes to one file, 64 to a batch.
	data := make([]byte, 64<<10)
	rand.Read(data)
	var seq uint64
	raw := wire.AppendOp(nil, &wire.Op{Code: wire.OpCreate, Path: "stream", Mode: 0o644})
	var frames [][]byte
	appendFrame := wire.AppendFrame // as the primary's batcher and writeBatches do
	if welcome.Sealed && peerlink.Sealed(c) {
		appendFrame = wire.AppendSealedFrame
	}
	for off := 0; off < streamBytes; off += len(data) {
		raw = wire.AppendOp(raw, &wire.Op{Code: wire.OpWrite, Path: "stream", Off: uint64(off), Data: data})
		if len(raw) >= batchRaw || off+len(data) >= streamBytes {
			seq++
			frames = append(frames, appendFrame(nil, &wire.Frame{Type: wire.TypeBatch, Seq: seq, Payload: raw}))
			raw = nil
		}
	}
	last := seq
	acked := make(chan error, 1)
	go func() { acked <- readAcksUntil(br, last, false) }()
	start := time.Now()
	for _, f := range frames {
		if err := w.write(f); err != nil {
			b.Fatal(err)
		}
	}
	if err := w.flush(); err != nil {
		b.Fatal(err)
	}
	if err := <-acked; err != nil {
		b.Fatal(err)
	}
	res := linkBenchResult{mbps: float64(streamBytes) / 1e6 / time.Since(start).Seconds()}

	// The sync path: one 4 KiB write and its sync request, then wait.
	small := data[:4096]
	for i := range syncs {
		seq++
		op := wire.Op{Code: wire.OpWrite, Path: "stream", Off: uint64(i) * 4096, Data: small}
		start := time.Now()
		w.frame(&wire.Frame{Type: wire.TypeBatch, Seq: seq, Payload: wire.AppendOp(nil, &op)})
		w.frame(&wire.Frame{Type: wire.TypeSync, Seq: seq})
		if err := w.flush(); err != nil {
			b.Fatal(err)
		}
		if err := readAcksUntil(br, seq, true); err != nil {
			b.Fatal(err)
		}
		res.syncs = append(res.syncs, time.Since(start))
	}
	return res
}

// readAcksUntil reads acks until seq is acknowledged (as durable, if
// durable).
func readAcksUntil(br *bufio.Reader, seq uint64, durable bool) error {
	for {
		f, err := wire.ReadFrame(br, nil)
		if err != nil {
			return err
		}
		switch {
		case f.Type == wire.TypeError:
			return fmt.Errorf("secondary refused: %s", f.Payload)
		case f.Type != wire.TypeAck:
			return fmt.Errorf("unexpected %s", f.Type)
		case f.Seq >= seq && (!durable || f.Flags&wire.FlagDurable != 0):
			return nil
		}
	}
}
