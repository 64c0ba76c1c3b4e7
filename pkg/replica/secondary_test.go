package replica

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/wire"
)

// A secondary fed batches by hand: compressed and uncompressed ones in
// turn (an uncompressed payload once shared its buffer with the next
// frame's decompression and corrupted it), applied in order, acknowledged
// as applied, and acknowledged as durable after a sync frame.
func TestSecondaryAppliesMixedBatches(t *testing.T) {
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	os.Mkdir(data, 0o755)
	key := []byte("0123456789abcdef")
	s := &Server{Key: key, StateDir: filepath.Join(dir, "state"), Dirs: []Dir{{Name: "data", Path: data}},
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	os.Mkdir(s.StateDir, 0o755)
	s.SetAccept(true)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go s.Serve(ctx, ln)

	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := wire.ClientHandshake(c, key, wire.Hello{Purpose: wire.PurposeReplicate, Session: 7, Dir: "data"}); err != nil {
		t.Fatal(err)
	}
	want := map[string][]byte{}
	var frames []byte
	seq := uint64(0)
	for i := 0; i < 12; i++ {
		name := string(rune('a'+i)) + ".dat"
		content := make([]byte, 200<<10)
		if i%2 == 0 {
			rand.Read(content) // incompressible: sent as it is
		} else {
			copy(content, bytes.Repeat([]byte("duet "), len(content)/5))
		}
		want[name] = content
		raw := wire.AppendOp(nil, &wire.Op{Code: wire.OpCreate, Path: name, Mode: 0o644})
		raw = wire.AppendOp(raw, &wire.Op{Code: wire.OpWrite, Path: name, Data: content})
		f := wire.Frame{Type: wire.TypeBatch, Payload: raw}
		if i%2 == 1 {
			f.Flags, f.Payload = wire.FlagZstd, wire.Compress(nil, raw)
		}
		seq++
		f.Seq = seq
		frames = wire.AppendFrame(frames, &f)
	}
	frames = wire.AppendFrame(frames, &wire.Frame{Type: wire.TypeSync, Seq: seq})
	if _, err := c.Write(frames); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	var applied, durable uint64
	for durable < seq {
		f, err := wire.ReadFrame(br, nil)
		if err != nil {
			t.Fatalf("after %d applied, %d durable: %v", applied, durable, err)
		}
		switch {
		case f.Type == wire.TypeError:
			t.Fatalf("secondary refused: %s", f.Payload)
		case f.Type != wire.TypeAck:
			t.Fatalf("unexpected %s", f.Type)
		case f.Flags&wire.FlagDurable != 0:
			durable = f.Seq
		default:
			if f.Seq != applied+1 {
				t.Fatalf("ack %d after %d: out of order", f.Seq, applied)
			}
			applied = f.Seq
		}
	}
	if applied != seq {
		t.Fatalf("durable ack before every batch was applied (%d of %d)", applied, seq)
	}
	for name, content := range want {
		got, err := os.ReadFile(filepath.Join(data, name))
		if err != nil || !bytes.Equal(got, content) {
			t.Fatalf("%s: %d bytes, want %d (%v)", name, len(got), len(content), err)
		}
	}
}
