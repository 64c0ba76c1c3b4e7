package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"runtime"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"
)

// allocated returns the heap bytes f allocates, the mean of a few runs.
// TotalAlloc only grows, whatever the collector does meanwhile.
func allocated(f func()) uint64 {
	const runs = 4
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for range runs {
		f()
	}
	runtime.ReadMemStats(&after)
	return (after.TotalAlloc - before.TotalAlloc) / runs
}

// rw is one end of a connection: what the peer sent, and where this end
// writes.
type rw struct {
	io.Reader
	io.Writer
}

// claim is a frame header announcing n bytes of payload of type t, and
// none of them: whoever allocates before checking allocates n.
func claim(t Type, n uint32) []byte {
	h := AppendFrame(nil, &Frame{Type: t})
	binary.LittleEndian.PutUint32(h[16:], n)
	return h
}

// A stranger's first frame claiming a large payload costs the server no
// allocation of it, and the client the same with a server's challenge.
func TestHandshakeFramesAreSmall(t *testing.T) {
	for _, tc := range []struct {
		name string
		run  func() error
	}{
		{"hello to the server", func() error {
			_, err := ServerHandshake(rw{bytes.NewReader(claim(TypeHello, MaxPayload)), io.Discard}, [][]byte{[]byte("0123456789abcdef")},
				func(Hello) Welcome { return Welcome{} })
			return err
		}},
		{"challenge to the client", func() error {
			_, err := ClientHandshake(rw{bytes.NewReader(claim(TypeChallenge, MaxPayload)), io.Discard}, [][]byte{[]byte("0123456789abcdef")},
				Hello{Purpose: PurposeReplicate, Dir: "data"})
			return err
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var err error
			n := allocated(func() { err = tc.run() })
			if !errors.Is(err, ErrBadFrame) {
				t.Errorf("error %v, want a bad frame", err)
			}
			if n > 64<<10 {
				t.Errorf("a handshake frame claiming %d bytes allocated %d KiB, want it refused before any allocation for it", MaxPayload, n>>10)
			}
		})
	}
}

// A refusal the client reads in its handshake comes from a peer not yet
// authenticated: its text in the error is an excerpt, quoted.
func TestHandshakeRefusalExcerpt(t *testing.T) {
	long := strings.Repeat("A", 3000) + "\nforged log line"
	in := AppendFrame(nil, &Frame{Type: TypeError, Payload: []byte(long)})
	_, err := ClientHandshake(rw{bytes.NewReader(in), io.Discard}, [][]byte{[]byte("0123456789abcdef")}, Hello{Purpose: PurposeReplicate, Dir: "data"})
	if err == nil {
		t.Fatal("refusal accepted")
	}
	msg := err.Error()
	if strings.Contains(msg, strings.Repeat("A", 101)) || strings.Contains(msg, "\n") || !strings.Contains(msg, "3016 bytes") {
		t.Fatalf("error of %d bytes (%.150q...): want at most 100 bytes of the peer's text, quoted, and its length", len(msg), msg)
	}
}

// minimal is the shortest encoding of an op: a peer filling a batch with
// it gets the most ops out of the fewest bytes.
var minimal = AppendOp(nil, &Op{Code: OpRemove, Path: "a"})

func TestDecodeOpsBounds(t *testing.T) {
	if len(minimal) != 13 {
		t.Fatalf("the smallest op takes %d bytes; the limits' comments say 13", len(minimal))
	}
	many := bytes.Repeat(minimal, MaxBatchOps+1) // 6.5 MiB, under MaxBatch
	if _, err := DecodeOps(many); !errors.Is(err, ErrBadOp) {
		t.Errorf("%d ops: error %v, want them refused", MaxBatchOps+1, err)
	}
	if ops, err := DecodeOps(many[:len(many)-len(minimal)]); err != nil || len(ops) != MaxBatchOps {
		t.Errorf("%d ops: %d decoded, %v", MaxBatchOps, len(ops), err)
	}
	big := bytes.Repeat(minimal, MaxBatch/len(minimal)+1)
	var err error
	if n := allocated(func() { _, err = DecodeOps(big) }); !errors.Is(err, ErrBadOp) || n > 64<<10 {
		t.Errorf("a batch of %d bytes: error %v after %d KiB allocated, want it refused before decoding", len(big), err, n>>10)
	}
}

// zstd bombs: a few kilobytes that decompress to many megabytes of small
// ops. A batch is refused past MaxBatch, whether the frame declares its
// size (refused before decoding) or not (decoding stops at the limit).
func TestBatchBombs(t *testing.T) {
	raw := bytes.Repeat(minimal, 64<<20/len(minimal))
	declared := Compress(nil, raw)
	var streamed bytes.Buffer
	w, err := zstd.NewWriter(&streamed, zstd.WithEncoderLevel(zstd.SpeedFastest))
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < len(raw); i += 1 << 20 {
		w.Write(raw[i:min(i+1<<20, len(raw))])
	}
	w.Close()
	for _, tc := range []struct {
		name  string
		zstd  []byte
		limit uint64
	}{
		{"size declared", declared, 64 << 10},
		// Decoding into a growing buffer allocates a few times its
		// final size along the way.
		{"size not declared", streamed.Bytes(), 8 * MaxBatch},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if len(tc.zstd) > 64<<10 {
				t.Fatalf("the bomb takes %d bytes: not much of a bomb", len(tc.zstd))
			}
			f := Frame{Type: TypeBatch, Flags: FlagZstd, Seq: 1, Payload: tc.zstd}
			var err error
			n := allocated(func() {
				var p []byte
				if p, err = Payload(&f, nil); err == nil {
					_, err = DecodeOps(p)
				}
			})
			if !errors.Is(err, ErrBadFrame) {
				t.Errorf("%d bytes of zstd for %d MiB of ops: error %v, want the batch refused", len(tc.zstd), len(raw)>>20, err)
			}
			if n > tc.limit {
				t.Errorf("%d bytes of zstd allocated %d MiB, want at most %d MiB", len(tc.zstd), n>>20, tc.limit>>20)
			}
		})
	}
}

// Counts in a manifest request or entry are checked against the bytes
// that follow them before anything is allocated for them.
func TestDecodeManifestQueryBounds(t *testing.T) {
	head := func(n uint64) []byte {
		return binary.AppendUvarint(AppendManifestQuery(nil, &ManifestQuery{Cutoff: 1})[:3], n)
	}
	for _, tc := range []struct {
		name string
		b    []byte
	}{
		{"2^32 paths in a few bytes", append(head(1<<32), 1, 'a')},
		// Less than 2 bytes a path: each has a length and a byte.
		{"a path a byte", append(head(150000), bytes.Repeat([]byte{'a'}, 150000)...)},
		{"more paths than a requester names", append(head(MaxWant+1), bytes.Repeat([]byte{1, 'a'}, MaxWant+1)...)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var err error
			if n := allocated(func() { _, err = DecodeManifestQuery(tc.b) }); !errors.Is(err, ErrBadOp) || n > 64<<10 {
				t.Errorf("error %v after %d KiB allocated: want it refused before allocating", err, n>>10)
			}
		})
	}
	q := ManifestQuery{Want: make([]string, MaxWant)}
	for i := range q.Want {
		q.Want[i] = "a"
	}
	if got, err := DecodeManifestQuery(AppendManifestQuery(nil, &q)); err != nil || len(got.Want) != MaxWant {
		t.Errorf("%d wanted paths: %d decoded, %v", MaxWant, len(got.Want), err)
	}
}

func TestDecodeEntriesBounds(t *testing.T) {
	e := AppendEntry(nil, &Entry{Path: "a"})
	if len(e) != 14 {
		t.Fatalf("the smallest entry takes %d bytes; the limits' comments say 14", len(e))
	}
	sums := binary.AppendUvarint(bytes.Clone(e[:len(e)-1]), 1<<32) // 2^32 sums, none there
	var err error
	if n := allocated(func() { _, err = DecodeEntries(sums) }); !errors.Is(err, ErrBadOp) || n > 64<<10 {
		t.Errorf("2^32 sums in a few bytes: error %v after %d KiB allocated, want it refused before allocating", err, n>>10)
	}
	many := bytes.Repeat(e, MaxManifestEntries+1)
	if _, err := DecodeEntries(many); !errors.Is(err, ErrBadOp) {
		t.Errorf("%d entries in a frame: error %v, want them refused", MaxManifestEntries+1, err)
	}
	if es, err := DecodeEntries(many[:len(many)-len(e)]); err != nil || len(es) != MaxManifestEntries {
		t.Errorf("%d entries: %d decoded, %v", MaxManifestEntries, len(es), err)
	}
}
