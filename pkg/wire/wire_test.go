package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestFrameRoundTrip(t *testing.T) {
	f := Frame{Type: TypeBatch, Flags: FlagZstd, Seq: 42, Payload: []byte("payload")}
	b := AppendFrame(nil, &f)
	got, err := ReadFrame(bytes.NewReader(b), nil)
	if err != nil {
		t.Fatal(err)
	}
	if got.Type != f.Type || got.Flags != f.Flags || got.Seq != f.Seq || !bytes.Equal(got.Payload, f.Payload) {
		t.Fatalf("got %+v", got)
	}
}

func TestFrameRejects(t *testing.T) {
	good := AppendFrame(nil, &Frame{Type: TypeAck, Seq: 1, Payload: []byte("x")})
	mut := func(i int, v byte) []byte {
		b := append([]byte(nil), good...)
		b[i] = v
		return b
	}
	huge := append([]byte(nil), good...)
	huge[16], huge[17], huge[18], huge[19] = 0xff, 0xff, 0xff, 0x7f
	tests := map[string][]byte{
		"bad magic":      mut(0, 'X'),
		"bad version":    mut(4, 99),
		"unknown type":   mut(5, 200),
		"crc mismatch":   mut(HeaderSize, 'y'),
		"oversize":       huge,
		"short header":   good[:10],
		"short payload":  good[:len(good)-1],
		"trailing bytes": append(append([]byte(nil), good...), 0),
	}
	for name, b := range tests {
		if _, err := DecodeFrame(b); err == nil {
			t.Errorf("%s: decoded without error", name)
		} else if !errors.Is(err, ErrBadFrame) {
			t.Errorf("%s: error %v is not ErrBadFrame", name, err)
		}
	}
}

func TestOpsRoundTrip(t *testing.T) {
	ops := []Op{
		{Code: OpMkdir, Path: "a", Mode: 0o755},
		{Code: OpWrite, Path: "a/b c\n\xff", Off: 1 << 40, Data: []byte("hello")},
		{Code: OpRename, Path: "a/x", Path2: "a/y"},
		{Code: OpSymlink, Path: "l", Path2: "../outside/is/fine/as/a/target"},
		{Code: OpSetattr, Path: "a", Mode: 0o700, UID: 1, GID: 2, Mtime: -5, Atime: 1e18},
	}
	var b []byte
	for i := range ops {
		b = AppendOp(b, &ops[i])
	}
	got, err := DecodeOps(b)
	if err != nil {
		t.Fatal(err)
	}
	for i := range got {
		if got[i].Data == nil {
			got[i].Data = ops[i].Data
		}
	}
	if !reflect.DeepEqual(got, ops) {
		t.Fatalf("round trip:\n got %+v\nwant %+v", got, ops)
	}
}

func TestValidPath(t *testing.T) {
	long := string(bytes.Repeat([]byte("x"), 256))
	for _, p := range []string{"", "/etc/passwd", "..", "a/../../b", "a//b", "a/./b", "a/", "a\x00b", long} {
		if ValidPath(p) == nil {
			t.Errorf("ValidPath(%q) accepted", p)
		}
	}
	for _, p := range []string{"a", "a/b", "with space", "new\nline", "\xff\xfe", "..a", "a..", string(bytes.Repeat([]byte("y"), 255))} {
		if err := ValidPath(p); err != nil {
			t.Errorf("ValidPath(%q): %v", p, err)
		}
	}
}

// deepPath is a valid path of n bytes: components of 255 bytes and less.
func deepPath(n int) string {
	var b []byte
	for rem := n; rem > 0; {
		if len(b) > 0 {
			b = append(b, '/')
			rem--
		}
		k := min(255, rem)
		if rem-k == 1 {
			k-- // room for "/d"
		}
		b = append(b, bytes.Repeat([]byte("d"), k)...)
		rem -= k
	}
	return string(b)
}

// A tree can be deeper than PATH_MAX (4096 bytes): such paths go on the
// wire, in ops, manifests and manifest requests, up to MaxPath.
func TestPathsPastPathMax(t *testing.T) {
	long := deepPath(5000)
	if len(long) != 5000 || ValidPath(long) != nil {
		t.Fatalf("test path of %d bytes: %v", len(long), ValidPath(long))
	}
	ops := []Op{{Code: OpRename, Path: long, Path2: deepPath(MaxPath)}}
	if got, err := DecodeOps(AppendOp(nil, &ops[0])); err != nil || !reflect.DeepEqual(got, ops) {
		t.Fatalf("op with a %d-byte path: %v", len(long), err)
	}
	e := Entry{Path: long, Mode: 0o644}
	if got, err := DecodeEntries(AppendEntry(nil, &e)); err != nil || len(got) != 1 || got[0].Path != long {
		t.Fatalf("manifest entry with a %d-byte path: %v", len(long), err)
	}
	q := ManifestQuery{Want: []string{long}, WantShift: []uint8{0}}
	if got, err := DecodeManifestQuery(AppendManifestQuery(nil, &q)); err != nil || !reflect.DeepEqual(got, q) {
		t.Fatalf("manifest request for a %d-byte path: %v", len(long), err)
	}
	if ValidPath(deepPath(MaxPath+1)) == nil {
		t.Fatalf("a path of %d bytes (past MaxPath) accepted", MaxPath+1)
	}
}

func TestDecodeOpsRejects(t *testing.T) {
	enc := func(op Op) []byte { return AppendOp(nil, &op) }
	tests := map[string][]byte{
		"escape":          enc(Op{Code: OpWrite, Path: "../etc/passwd", Data: []byte("x")}),
		"absolute":        enc(Op{Code: OpCreate, Path: "/etc/shadow"}),
		"rename escape":   enc(Op{Code: OpRename, Path: "a", Path2: "../../b"}),
		"unknown code":    {99},
		"truncated":       enc(Op{Code: OpWrite, Path: "a", Data: []byte("hello")})[:8],
		"data on mkdir":   enc(Op{Code: OpMkdir, Path: "a", Data: []byte("x")}),
		"huge offset":     enc(Op{Code: OpWrite, Path: "a", Off: 1 << 63, Data: []byte("x")}),
		"empty symlink":   enc(Op{Code: OpSymlink, Path: "a"}),
		"length too long": {byte(OpWrite), 0xff, 0xff, 0xff, 0xff, 0x0f},
		"path too long":   enc(Op{Code: OpCreate, Path: deepPath(MaxPath + 1)}),
	}
	for name, b := range tests {
		if _, err := DecodeOps(b); err == nil {
			t.Errorf("%s: decoded without error", name)
		}
	}
}

func TestManifestQueryRoundTrip(t *testing.T) {
	q := ManifestQuery{Cutoff: -7, Want: []string{"a", "b/c"}, WantShift: []uint8{0, 12}, Gen: 1 << 60}
	got, err := DecodeManifestQuery(AppendManifestQuery(nil, &q))
	if err != nil || !reflect.DeepEqual(got, q) {
		t.Fatalf("round trip: %+v, %v; want %+v", got, err, q)
	}
	for _, f := range []ManifestQuery{{All: true, Want: []string{}, WantShift: []uint8{}}, {MovedDirs: true, Cutoff: 5, Want: []string{}, WantShift: []uint8{}}, {All: true, MovedDirs: true, Want: []string{}, WantShift: []uint8{}}} {
		if got, err := DecodeManifestQuery(AppendManifestQuery(nil, &f)); err != nil || !reflect.DeepEqual(got, f) {
			t.Fatalf("round trip: %+v, %v; want %+v", got, err, f)
		}
	}
	if b := AppendManifestQuery(nil, &ManifestQuery{MovedDirs: true}); b[0] != 2 {
		t.Fatalf("MovedDirs is bit 1 of the first byte (a replica that predates it reads it as All): %#x", b[0])
	}
	if got, err := DecodeManifestQuery(append([]byte{4}, AppendManifestQuery(nil, &q)[1:]...)); err != nil || !got.All {
		t.Fatalf("a flag this build does not know must read as All (every checksum): %+v, %v", got, err)
	}
	if got, err := DecodeManifestQuery(nil); err != nil || !got.All {
		t.Fatalf("empty request (verify) must ask for every checksum: %+v, %v", got, err)
	}
	bad := map[string][]byte{
		"escaping path":  AppendManifestQuery(nil, &ManifestQuery{Want: []string{"../etc"}}),
		"trailing bytes": append(AppendManifestQuery(nil, &q), 0),
		"huge count":     {0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f},
		"truncated":      AppendManifestQuery(nil, &q)[:6],
	}
	for name, b := range bad {
		if _, err := DecodeManifestQuery(b); err == nil {
			t.Errorf("%s: decoded without error", name)
		}
	}
	d := ResyncDone{Gen: 42, Report: []byte("p\tremoved\n")}
	gd, err := DecodeResyncDone(AppendResyncDone(nil, &d))
	if err != nil || gd.Gen != 42 || string(gd.Report) != string(d.Report) {
		t.Fatalf("resync done round trip: %+v, %v", gd, err)
	}
	if _, err := DecodeResyncDone([]byte{1, 2}); err == nil {
		t.Fatal("short resync-done payload decoded")
	}
}

func TestEntriesRoundTrip(t *testing.T) {
	es := []Entry{
		{Path: ".", Mode: fs.ModeDir | 0o755},
		{Path: "f", Mode: 0o644, Size: 70000, Mtime: 123, Ctime: -5, Flags: EntryRecent | EntrySummed, Ino: 12, Sums: []Sum{{1}, {2}}},
		{Path: "l", Mode: fs.ModeSymlink | 0o777, Target: "f"},
	}
	var b []byte
	for i := range es {
		b = AppendEntry(b, &es[i])
	}
	got, err := DecodeEntries(b)
	if err != nil {
		t.Fatal(err)
	}
	for i := range got {
		if len(got[i].Sums) == 0 {
			got[i].Sums = es[i].Sums
		}
	}
	if !reflect.DeepEqual(got, es) {
		t.Fatalf("got %+v", got)
	}
}

// TestBlockShiftOnTheWire: an entry's and a wanted path's block shift
// travel; one out of range (a hostile or broken peer: blocks of 1 byte
// would make 16 bytes of sums per byte, of 1 GiB compare nothing useful)
// is refused with an error naming it.
func TestBlockShiftOnTheWire(t *testing.T) {
	e := Entry{Path: "f", Mode: 0o644, Size: 9000, Flags: EntrySummed, Shift: 12, Sums: make([]Sum, 3)}
	got, err := DecodeEntries(AppendEntry(nil, &e))
	if err != nil || len(got) != 1 || got[0].Shift != 12 || got[0].SumShift() != 12 || len(got[0].Sums) != 3 {
		t.Fatalf("decoded %+v, %v: want shift 12 and 3 sums", got, err)
	}
	if (&Entry{}).SumShift() != BlockShift {
		t.Fatalf("an entry without a shift sums blocks of 1<<%d, want 1<<%d", (&Entry{}).SumShift(), BlockShift)
	}
	for _, bad := range []uint8{1, 11, 17, 255} {
		e.Shift = bad
		if _, err := DecodeEntries(AppendEntry(nil, &e)); !errors.Is(err, ErrBadOp) || !strings.Contains(err.Error(), "block") {
			t.Errorf("an entry of shift %d: error %v, want it refused", bad, err)
		}
	}
	q := ManifestQuery{Cutoff: 5, Want: []string{"a", "b/c", "d"}, WantShift: []uint8{12, 0, 16}}
	gq, err := DecodeManifestQuery(AppendManifestQuery(nil, &q))
	if err != nil || !reflect.DeepEqual(gq.Want, q.Want) || !reflect.DeepEqual(gq.WantShift, q.WantShift) {
		t.Fatalf("decoded %+v, %v: want %+v", gq, err, q)
	}
	q.WantShift[1] = 20
	if _, err := DecodeManifestQuery(AppendManifestQuery(nil, &q)); !errors.Is(err, ErrBadOp) || !strings.Contains(err.Error(), "b/c") {
		t.Errorf("a wanted path of shift 20: error %v, want it refused naming the path", err)
	}
}

// TestEntryGenNeverOnTheWire: an entry's generation is the local scan's
// (the primary's shadow tells reused inode numbers apart by it): neither
// sent nor taken from a peer's manifest, whose flags byte may claim it.
func TestEntryGenNeverOnTheWire(t *testing.T) {
	e := Entry{Path: "f", Mode: 0o644, Ino: 12, Gen: 0xabcd, Flags: EntryGen | EntryRecent}
	b := AppendEntry(nil, &e)
	plain := AppendEntry(nil, &Entry{Path: "f", Mode: 0o644, Ino: 12, Flags: EntryRecent})
	if !bytes.Equal(b, plain) {
		t.Fatalf("the generation reached the encoding: % x, want % x", b, plain)
	}
	// A hostile peer's entry with the flag set: the flags byte comes
	// before the block shift, the empty target's and the sums' counts.
	forged := bytes.Clone(plain)
	at := len(forged) - 4
	if EntryFlags(forged[at]) != EntryRecent {
		t.Fatalf("the flags byte is not at %d: % x", at, forged)
	}
	forged[at] |= byte(EntryGen)
	got, err := DecodeEntries(forged)
	if err != nil {
		t.Fatal(err)
	}
	if got[0].Flags != EntryRecent || got[0].Gen != 0 {
		t.Fatalf("decoded flags %#x, generation %#x: want %#x and none", got[0].Flags, got[0].Gen, EntryRecent)
	}
}

func TestCompressRoundTrip(t *testing.T) {
	src := bytes.Repeat([]byte("duet "), 10000)
	c := Compress(nil, src)
	if len(c) >= len(src)/10 {
		t.Fatalf("repetitive input compressed to %d of %d bytes", len(c), len(src))
	}
	got, err := Decompress(nil, c)
	if err != nil || !bytes.Equal(got, src) {
		t.Fatalf("decompress: %v", err)
	}
	if _, err := Decompress(nil, []byte("not zstd")); err == nil {
		t.Fatal("garbage decompressed")
	}
}

func TestHandshake(t *testing.T) {
	for _, tc := range []struct {
		name      string
		ckey, key []string
		wantErr   bool
		sealed    bool // the server accepts sealed frames
	}{
		{"same key, sealed frames accepted", []string{"secret"}, []string{"secret"}, false, true},
		{"same key", []string{"secret"}, []string{"secret"}, false, false},
		{"wrong key", []string{"secret"}, []string{"other"}, true, false},
		// A rotation from "old" to "new": either node may hold both.
		{"server rotated", []string{"old"}, []string{"new", "old"}, false, false},
		{"client rotated", []string{"new", "old"}, []string{"old"}, false, false},
		{"both rotated", []string{"new", "old"}, []string{"new", "old"}, false, false},
		{"server dropped the old key", []string{"new", "old"}, []string{"new"}, false, false},
		{"unrelated keys", []string{"new", "old"}, []string{"other"}, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, s := net.Pipe()
			defer c.Close()
			defer s.Close()
			done := make(chan error, 1)
			go func() {
				_, err := ServerHandshake(s, keyList(tc.key...), func(h Hello) Welcome {
					return Welcome{Session: h.Session, Applied: 7, Gen: 11, SyncTime: -3, State: CopyConsistent | CopyDiverged, Sealed: tc.sealed}
				})
				if err != nil {
					s.Close()
				}
				done <- err
			}()
			w, err := ClientHandshake(c, keyList(tc.ckey...), Hello{Purpose: PurposeReplicate, Session: 9, Dir: "a"})
			if err != nil {
				c.Close() // as a real client hangs up
			}
			serr := <-done
			if tc.wantErr {
				if err == nil || serr == nil {
					t.Fatalf("client err %v, server err %v: want both to fail", err, serr)
				}
				return
			}
			want := Welcome{Session: 9, Applied: 7, Gen: 11, SyncTime: -3, State: CopyConsistent | CopyDiverged, Sealed: tc.sealed}
			if err != nil || serr != nil || w != want {
				t.Fatalf("client %v server %v welcome %+v", err, serr, w)
			}
		})
	}
}

// TestHelloEpoch: the primary's epoch rides after the directory's name;
// a hello without it (a manifest request, a sender of an older version)
// reads as epoch 0, fewer than its 8 bytes are refused, and what follows
// it is not read.
func TestHelloEpoch(t *testing.T) {
	for _, h := range []Hello{
		{Purpose: PurposeReplicate, Session: 9, Dir: "data", Epoch: 7<<8 | 2},
		{Purpose: PurposeReplicate, Session: 9, Dir: "data"},
		{Purpose: PurposeManifest, Dir: "data"},
	} {
		h.Nonce[3] = 1
		got, err := DecodeHello(encodeHello(&h))
		if err != nil || got != h {
			t.Errorf("%+v: decoded %+v, %v", h, got, err)
		}
	}
	// What a sender before the epoch wrote.
	old := []byte{byte(PurposeReplicate)}
	old = append(old, make([]byte, 32)...)
	old = binary.LittleEndian.AppendUint64(old, 5)
	old = appendString(old, "data")
	if got, err := DecodeHello(old); err != nil || got.Epoch != 0 || got.Dir != "data" || got.Session != 5 {
		t.Errorf("an older sender's hello: %+v, %v", got, err)
	}
	for _, extra := range []int{1, 7} {
		b := append(append([]byte(nil), old...), make([]byte, extra)...)
		if _, err := DecodeHello(b); !errors.Is(err, ErrBadFrame) {
			t.Errorf("%d bytes after the name: %v, want ErrBadFrame", extra, err)
		}
	}
	// A later version's fields after the epoch are not read.
	later := binary.LittleEndian.AppendUint64(append([]byte(nil), old...), 9<<8|1)
	later = append(later, "a field of a later version"...)
	if got, err := DecodeHello(later); err != nil || got.Epoch != 9<<8|1 {
		t.Errorf("a later version's hello: %+v, %v", got, err)
	}
}

// TestSealedFrames: a sealed frame (for a TLS link: its CRC covers the
// header only) is read as it was written on a sealed link, refused on
// another, and refused with a damaged header; unsealed, any reader takes
// it.
func TestSealedFrames(t *testing.T) {
	want := Frame{Type: TypeBatch, Flags: FlagZstd, Seq: 42, Payload: []byte("a payload")}
	sealed := AppendSealedFrame(nil, &want)
	f, err := ReadSealedFrame(bytes.NewReader(sealed), nil)
	if err != nil || f.Type != want.Type || f.Flags != want.Flags|FlagSealed || f.Seq != want.Seq || !bytes.Equal(f.Payload, want.Payload) {
		t.Fatalf("ReadSealedFrame = %+v, %v; want %+v with FlagSealed", f, err, want)
	}
	// Its payload is not checked: TLS's AEAD does that.
	if _, err := ReadFrame(bytes.NewReader(sealed), nil); !errors.Is(err, ErrBadFrame) || !strings.Contains(err.Error(), "without TLS") {
		t.Fatalf("ReadFrame of a sealed frame: %v, want a bad frame naming the link without TLS", err)
	}
	bad := append([]byte(nil), sealed...)
	bad[9] ^= 1 // the sequence
	if _, err := ReadSealedFrame(bytes.NewReader(bad), nil); !errors.Is(err, ErrBadFrame) {
		t.Fatalf("ReadSealedFrame of a damaged header: %v, want a bad frame", err)
	}
	plain := Unsealed(sealed)
	if bytes.Equal(plain, sealed) || &plain[0] == &sealed[0] {
		t.Fatal("Unsealed returned the sealed frame itself")
	}
	if !bytes.Equal(plain, AppendFrame(nil, &want)) {
		t.Fatal("Unsealed differs from the frame AppendFrame makes")
	}
	for name, read := range map[string]func(io.Reader, []byte) (Frame, error){"ReadFrame": ReadFrame, "ReadSealedFrame": ReadSealedFrame} {
		f, err := read(bytes.NewReader(plain), nil)
		if err != nil || f.Flags != want.Flags || !bytes.Equal(f.Payload, want.Payload) {
			t.Fatalf("%s of the unsealed frame = %+v, %v", name, f, err)
		}
		plain[HeaderSize] ^= 1
		if _, err := read(bytes.NewReader(plain), nil); !errors.Is(err, ErrBadFrame) {
			t.Fatalf("%s of an unsealed frame with a damaged payload: %v, want a bad frame", name, err)
		}
		plain[HeaderSize] ^= 1
	}
	if p := AppendFrame(nil, &want); &Unsealed(p)[0] != &p[0] {
		t.Fatal("Unsealed copied a frame that was not sealed")
	}
}

func keyList(keys ...string) [][]byte {
	var out [][]byte
	for _, k := range keys {
		out = append(out, []byte(k))
	}
	return out
}

// FuzzDecodeFrame feeds arbitrary bytes to every decoder a peer reaches.
// Seeds live in testdata/fuzz/FuzzDecodeFrame.
func FuzzDecodeFrame(f *testing.F) {
	var ops []byte
	ops = AppendOp(ops, &Op{Code: OpWrite, Path: "a/b", Off: 3, Data: []byte("xyz")})
	ops = AppendOp(ops, &Op{Code: OpRename, Path: "a/b", Path2: "c"})
	f.Add(AppendFrame(nil, &Frame{Type: TypeBatch, Seq: 1, Payload: ops}))
	f.Add(AppendFrame(nil, &Frame{Type: TypeBatch, Flags: FlagZstd, Seq: 2, Payload: Compress(nil, ops)}))
	f.Add(AppendFrame(nil, &Frame{Type: TypeManifest, Payload: AppendEntry(nil, &Entry{Path: "x", Sums: []Sum{{}}})}))
	f.Add(AppendFrame(nil, &Frame{Type: TypeHello, Payload: encodeHello(&Hello{Purpose: PurposeReplicate, Dir: "n"})}))
	f.Add(AppendFrame(nil, &Frame{Type: TypeManifestQ, Payload: AppendManifestQuery(nil, &ManifestQuery{Cutoff: 5, Want: []string{"a/b"}, Gen: 9})}))
	f.Add(AppendFrame(nil, &Frame{Type: TypeSync, Flags: FlagResyncDone, Payload: AppendResyncDone(nil, &ResyncDone{Gen: 3, Report: []byte("x\tremoved\n")})}))
	f.Fuzz(func(t *testing.T, b []byte) {
		fr, err := DecodeFrame(b)
		if err != nil {
			return
		}
		p, err := Payload(&fr, nil)
		if err != nil {
			return
		}
		if ops, err := DecodeOps(p); err == nil {
			for _, op := range ops {
				if ValidPath(op.Path) != nil {
					t.Fatalf("decoded op with invalid path %q", op.Path)
				}
			}
		}
		DecodeEntries(p)
		DecodeHello(p)
		if q, err := DecodeManifestQuery(p); err == nil {
			for _, w := range q.Want {
				if ValidPath(w) != nil {
					t.Fatalf("decoded manifest request with invalid path %q", w)
				}
			}
		}
		DecodeResyncDone(p)
	})
}

// TestFuzzCorpusPresent keeps the committed seed corpus from vanishing.
func TestFuzzCorpusPresent(t *testing.T) {
	m, _ := filepath.Glob(filepath.Join("testdata", "fuzz", "FuzzDecodeFrame", "*"))
	if len(m) == 0 {
		if _, err := os.Stat("testdata"); err != nil {
			t.Skip("no seed corpus directory")
		}
		t.Fatal("seed corpus testdata/fuzz/FuzzDecodeFrame is empty")
	}
}

// TestFrameIn: a frame made in place around its payload shares the
// payload's memory, and its header and CRC are the format's, checked
// field by field and with a CRC32C of its own (AppendFrame is FrameIn
// too, so comparing the two would not see a wrong one; from a review).
func TestFrameIn(t *testing.T) {
	payload := []byte("a payload of some bytes")
	for _, sealed := range []bool{false, true} {
		in := append(make([]byte, HeaderSize), payload...)
		b := FrameIn(in, &Frame{Type: TypeBatch, Flags: FlagZstd, Seq: 7}, sealed)
		if &b[0] != &in[0] {
			t.Fatalf("sealed %v: FrameIn copied the payload", sealed)
		}
		le := binary.LittleEndian
		flags := FlagZstd
		if sealed {
			flags |= FlagSealed
		}
		if le.Uint32(b) != Magic || b[4] != Version || b[5] != byte(TypeBatch) || le.Uint16(b[6:]) != flags ||
			le.Uint64(b[8:]) != 7 || le.Uint32(b[16:]) != uint32(len(payload)) || !bytes.Equal(b[HeaderSize:], payload) {
			t.Fatalf("sealed %v: header %x", sealed, b[:HeaderSize])
		}
		covered := b[:20]
		if !sealed {
			covered = append(append([]byte(nil), b[:20]...), payload...)
		}
		if got, want := le.Uint32(b[20:]), crc32.Checksum(covered, crc32.MakeTable(crc32.Castagnoli)); got != want {
			t.Fatalf("sealed %v: CRC %#x, want %#x", sealed, got, want)
		}
		if _, err := ReadFrame(bytes.NewReader(b), nil); (err != nil) != sealed {
			t.Fatalf("sealed %v: ReadFrame: %v", sealed, err)
		}
	}
}
