package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
)

// OpCode names a change the applier makes to the replica.
type OpCode uint8

// Operations. Paths are relative to the replica root.
const (
	OpMkdir    OpCode = 1  // Path, Mode
	OpCreate   OpCode = 2  // Path, Mode: empty regular file, replacing what is there
	OpSymlink  OpCode = 3  // Path, Path2 = target
	OpMknod    OpCode = 4  // Path, Mode, Rdev (FIFOs and sockets)
	OpLink     OpCode = 5  // Path = existing, Path2 = new name
	OpRename   OpCode = 6  // Path → Path2, replacing Path2
	OpRemove   OpCode = 7  // Path, recursively for a directory
	OpTruncate OpCode = 8  // Path, Off = size
	OpWrite    OpCode = 9  // Path, Off, Data
	OpPunch    OpCode = 10 // Path, Off, Len: a hole
	OpSetattr  OpCode = 11 // Path, Mode, UID, GID, Mtime, Atime (ns since the epoch)
	opMax             = OpSetattr
)

var opNames = [...]string{"", "mkdir", "create", "symlink", "mknod", "link", "rename", "remove",
	"truncate", "write", "punch", "setattr"}

func (c OpCode) String() string {
	if c > 0 && c <= opMax {
		return opNames[c]
	}
	return fmt.Sprintf("op(%d)", uint8(c))
}

// Op is one change to the replica.
type Op struct {
	Code  OpCode
	Path  string
	Path2 string
	Mode  uint32
	UID   uint32
	GID   uint32
	Rdev  uint64
	Off   uint64
	Len   uint64
	Mtime int64
	Atime int64
	Data  []byte
}

// MaxPath bounds a path on the wire. It is past PATH_MAX (4096): a tree
// can be deeper than one lookup takes, and its nodes walk such paths a
// group of components at a time. A path longer still is left out of
// scans, with a warning.
const MaxPath = 64 << 10

// ErrBadOp wraps every op decoding error.
var ErrBadOp = errors.New("bad op")

// ValidPath reports why p cannot name an entry under a replica root: it
// must be relative, without empty, "." or ".." components, without NUL,
// with components of at most 255 bytes. Any other byte is allowed, as in
// Linux file names.
func ValidPath(p string) error {
	if p == "" {
		return errors.New("empty path")
	}
	if len(p) > MaxPath {
		return fmt.Errorf("path of %d bytes exceeds %d", len(p), MaxPath)
	}
	if p[0] == '/' {
		return fmt.Errorf("absolute path %q", p)
	}
	if strings.IndexByte(p, 0) >= 0 {
		return fmt.Errorf("path %q contains NUL", p)
	}
	for _, c := range strings.Split(p, "/") {
		switch {
		case c == "":
			return fmt.Errorf("path %q has an empty component", p)
		case c == "." || c == "..":
			return fmt.Errorf("path %q has a %q component", p, c)
		case len(c) > 255:
			return fmt.Errorf("path %q has a component longer than 255 bytes", p)
		}
	}
	return nil
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

// AppendOp appends the encoding of op to b.
func AppendOp(b []byte, op *Op) []byte {
	return append(AppendOpHeader(b, op, len(op.Data)), op.Data...)
}

// AppendOpHeader appends the encoding of op without its data, as if its
// data were n bytes: the caller appends those n bytes (read straight into
// the buffer, without a copy through op.Data).
func AppendOpHeader(b []byte, op *Op, n int) []byte {
	b = append(b, byte(op.Code))
	b = appendString(b, op.Path)
	b = appendString(b, op.Path2)
	for _, v := range []uint64{uint64(op.Mode), uint64(op.UID), uint64(op.GID), op.Rdev, op.Off, op.Len} {
		b = binary.AppendUvarint(b, v)
	}
	b = binary.AppendVarint(b, op.Mtime)
	b = binary.AppendVarint(b, op.Atime)
	return binary.AppendUvarint(b, uint64(n))
}

// decoder reads fields from a payload, keeping the first error.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) uvarint(what string) uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.err = fmt.Errorf("%w: truncated or overlong %s", ErrBadOp, what)
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) varint(what string) int64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.err = fmt.Errorf("%w: truncated or overlong %s", ErrBadOp, what)
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) u32(what string) uint32 {
	v := d.uvarint(what)
	if v > 0xffffffff && d.err == nil {
		d.err = fmt.Errorf("%w: %s %d does not fit 32 bits", ErrBadOp, what, v)
	}
	return uint32(v)
}

func (d *decoder) bytes(what string, max uint64) []byte {
	n := d.uvarint(what + " length")
	if d.err != nil {
		return nil
	}
	if n > max || n > uint64(len(d.b)) {
		d.err = fmt.Errorf("%w: %s of %d bytes (limit %d, %d left)", ErrBadOp, what, n, max, len(d.b))
		return nil
	}
	if n == 0 {
		return nil
	}
	v := d.b[:n:n]
	d.b = d.b[n:]
	return v
}

func (d *decoder) byte1(what string) byte {
	if d.err != nil {
		return 0
	}
	if len(d.b) == 0 {
		d.err = fmt.Errorf("%w: missing %s", ErrBadOp, what)
		return 0
	}
	v := d.b[0]
	d.b = d.b[1:]
	return v
}

// MaxBatch bounds a batch's payload once decompressed. The primary cuts a
// batch at 4 MiB of ops, and an op carries at most 1 MiB of data and two
// paths.
const MaxBatch = 16 << 20

// MaxBatchOps bounds the ops of one batch. A decoded Op takes about ten
// times the 13 bytes of the smallest encoding: without a bound, a batch
// of small ops would cost ten times its size (2^19 ops take 60 MiB). The
// primary's 4 MiB batches hold at most 4 MiB/13, about 323,000 ops.
const MaxBatchOps = 1 << 19

// DecodeOps decodes a batch payload (already decompressed), refusing one
// over MaxBatch bytes or MaxBatchOps ops. Data slices alias b. Every path
// is checked with ValidPath.
func DecodeOps(b []byte) ([]Op, error) {
	if len(b) > MaxBatch {
		return nil, fmt.Errorf("%w: batch of %d bytes exceeds the %d limit", ErrBadOp, len(b), MaxBatch)
	}
	d := decoder{b: b}
	var ops []Op
	for len(d.b) > 0 {
		if len(ops) == MaxBatchOps {
			return nil, fmt.Errorf("%w: batch of more than %d ops", ErrBadOp, MaxBatchOps)
		}
		var op Op
		op.Code = OpCode(d.byte1("op code"))
		if d.err == nil && (op.Code == 0 || op.Code > opMax) {
			return nil, fmt.Errorf("%w: unknown op code %d", ErrBadOp, op.Code)
		}
		op.Path = string(d.bytes("path", MaxPath))
		op.Path2 = string(d.bytes("second path", MaxPath))
		op.Mode = d.u32("mode")
		op.UID = d.u32("uid")
		op.GID = d.u32("gid")
		op.Rdev = d.uvarint("rdev")
		op.Off = d.uvarint("offset")
		op.Len = d.uvarint("length")
		op.Mtime = d.varint("mtime")
		op.Atime = d.varint("atime")
		op.Data = d.bytes("data", MaxBatch)
		if d.err != nil {
			return nil, d.err
		}
		if err := op.check(); err != nil {
			return nil, err
		}
		ops = append(ops, op)
	}
	return ops, nil
}

// check validates the fields an op uses.
func (op *Op) check() error {
	if err := ValidPath(op.Path); err != nil {
		return fmt.Errorf("%w: %s: %v", ErrBadOp, op.Code, err)
	}
	switch op.Code {
	case OpLink, OpRename:
		if err := ValidPath(op.Path2); err != nil {
			return fmt.Errorf("%w: %s target: %v", ErrBadOp, op.Code, err)
		}
	case OpSymlink:
		if op.Path2 == "" || strings.IndexByte(op.Path2, 0) >= 0 {
			return fmt.Errorf("%w: symlink %q: empty target or NUL in target", ErrBadOp, op.Path)
		}
	case OpWrite, OpPunch, OpTruncate:
		if op.Off > 1<<62 || op.Len > 1<<62 || op.Off+op.Len+uint64(len(op.Data)) > 1<<62 {
			return fmt.Errorf("%w: %s %q: offset %d length %d out of range", ErrBadOp, op.Code, op.Path, op.Off, op.Len)
		}
	}
	if op.Code != OpWrite && len(op.Data) != 0 {
		return fmt.Errorf("%w: %s %q carries %d data bytes", ErrBadOp, op.Code, op.Path, len(op.Data))
	}
	return nil
}
