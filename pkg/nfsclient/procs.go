package nfsclient

import (
	"context"
	"time"
)

// Attr is an object's attributes (fattr3) but for the space used, the
// device numbers and the filesystem ID.
type Attr struct {
	Type                FileType
	Mode                uint32 // permission bits, setuid, setgid, sticky
	Nlink               uint32
	UID, GID            uint32
	Size                uint64
	Fileid              uint64 // Linux calls a change of it for one handle ESTALE
	Atime, Mtime, Ctime time.Time
}

// FileType is an object's type (ftype3).
type FileType uint32

// The types of ftype3.
const (
	TypeReg  FileType = 1
	TypeDir  FileType = 2
	TypeBlk  FileType = 3
	TypeChr  FileType = 4
	TypeLnk  FileType = 5
	TypeSock FileType = 6
	TypeFIFO FileType = 7
)

// SetAttr says which attributes SETATTR, CREATE and MKDIR set: the
// non-nil ones (new(uint32(0o644)) makes one). Times are set to the
// given time, not the server's.
type SetAttr struct {
	Mode, UID, GID *uint32
	Size           *uint64
	Atime, Mtime   *time.Time
}

// Stable is how durable a WRITE must be, or was made, before its reply
// (stable_how).
type Stable uint32

// The levels of stable_how.
const (
	Unstable Stable = 0 // in the server's memory; COMMIT makes it durable
	DataSync Stable = 1 // data durable, metadata maybe not
	FileSync Stable = 2 // data and metadata durable
)

// WriteResult is a WRITE's reply.
type WriteResult struct {
	Count     uint32 // bytes written, which may be fewer than sent
	Committed Stable // how durable they are: at least what was asked
	// Verifier changes when the server restarts; a COMMIT with another
	// one means unstable writes since may be lost and must be sent again.
	Verifier uint64
}

// CreateMode is how CREATE treats an existing file (createmode3).
type CreateMode uint32

// The modes of createmode3 but EXCLUSIVE.
const (
	Unchecked CreateMode = 0 // take an existing file, setting its attributes
	Guarded   CreateMode = 1 // fail with NFS3ERR_EXIST if it exists
)

// DirEntry is one entry of READDIRPLUS.
type DirEntry struct {
	Name   string
	Fileid uint64
	Handle []byte // nil if the server sent none
	Attr   *Attr  // nil if the server sent none
}

// FSStat is FSSTAT's reply: sizes in bytes, file slots in files.
type FSStat struct {
	TotalBytes, FreeBytes, AvailBytes uint64
	TotalFiles, FreeFiles, AvailFiles uint64
}

// NFSv3 procedure numbers (RFC 1813) and MOUNT's MNT.
const (
	procNull        = 0
	procGetattr     = 1
	procSetattr     = 2
	procLookup      = 3
	procAccess      = 4
	procReadlink    = 5
	procRead        = 6
	procWrite       = 7
	procCreate      = 8
	procMkdir       = 9
	procSymlink     = 10
	procRemove      = 12
	procRmdir       = 13
	procRename      = 14
	procReaddirplus = 17
	procFsstat      = 18
	procCommit      = 21
	procMnt         = 1
)

// nfs makes an NFS call and returns its results after an OK status.
func (c *Client) nfs(ctx context.Context, proc uint32, name string, args enc) (*dec, error) {
	d, err := c.call(ctx, progNFS, proc, name, args)
	if err != nil {
		return nil, err
	}
	if st := d.u32(); st != StatusOK {
		return nil, &StatusError{Proc: name, Status: st}
	}
	return d, nil
}

// decoded reports a reply too short for what was read from it.
func decoded(name string, d *dec) error {
	if d.bad {
		return &RPCError{Proc: name, Reason: "reply cut short"}
	}
	return nil
}

// Mount asks MOUNT for the handle of the exported directory path (MNT).
// The handle stays valid across remounts and, with pkg/nfsd, across
// failovers: a client needs to mount only once.
func (c *Client) Mount(ctx context.Context, path string) ([]byte, error) {
	d, err := c.call(ctx, progMount, procMnt, "MNT", enc{}.str(path))
	if err != nil {
		return nil, err
	}
	if st := d.u32(); st != StatusOK {
		return nil, &StatusError{Proc: "MNT", Status: st}
	}
	fh := d.opaque()
	return fh, decoded("MNT", d) // the auth flavors that follow are not used
}

// Null makes the NFS NULL call: a round trip that touches nothing.
func (c *Client) Null(ctx context.Context) error {
	_, err := c.call(ctx, progNFS, procNull, "NULL", nil)
	return err
}

// Getattr returns fh's attributes.
func (c *Client) Getattr(ctx context.Context, fh []byte) (Attr, error) {
	d, err := c.nfs(ctx, procGetattr, "GETATTR", enc{}.opaque(fh))
	if err != nil {
		return Attr{}, err
	}
	a := d.fattr()
	return a, decoded("GETATTR", d)
}

// Setattr sets fh's attributes named in a, unguarded; Size truncates or
// extends the file.
func (c *Client) Setattr(ctx context.Context, fh []byte, a SetAttr) error {
	_, err := c.nfs(ctx, procSetattr, "SETATTR", enc{}.opaque(fh).sattr(a).u32(0))
	return err
}

// Lookup returns the handle of name in the directory dir.
func (c *Client) Lookup(ctx context.Context, dir []byte, name string) ([]byte, error) {
	d, err := c.nfs(ctx, procLookup, "LOOKUP", enc{}.dirop(dir, name))
	if err != nil {
		return nil, err
	}
	fh := d.opaque()
	return fh, decoded("LOOKUP", d)
}

// Access returns which of the rights in mask (ACCESS3_READ 0x1, LOOKUP
// 0x2, MODIFY 0x4, EXTEND 0x8, DELETE 0x10, EXECUTE 0x20) the server
// grants on fh.
func (c *Client) Access(ctx context.Context, fh []byte, mask uint32) (uint32, error) {
	d, err := c.nfs(ctx, procAccess, "ACCESS", enc{}.opaque(fh).u32(mask))
	if err != nil {
		return 0, err
	}
	d.postOpAttr()
	granted := d.u32()
	return granted, decoded("ACCESS", d)
}

// Readlink returns the target of the symlink fh.
func (c *Client) Readlink(ctx context.Context, fh []byte) (string, error) {
	d, err := c.nfs(ctx, procReadlink, "READLINK", enc{}.opaque(fh))
	if err != nil {
		return "", err
	}
	d.postOpAttr()
	target := string(d.opaque())
	return target, decoded("READLINK", d)
}

// Read returns up to count bytes of fh from off, fewer at the end of the
// file or if the server sends less, and whether the end was reached.
func (c *Client) Read(ctx context.Context, fh []byte, off uint64, count uint32) (data []byte, eof bool, err error) {
	d, err := c.nfs(ctx, procRead, "READ", enc{}.opaque(fh).u64(off).u32(count))
	if err != nil {
		return nil, false, err
	}
	d.postOpAttr()
	d.u32() // count, which data's length repeats
	eof = d.bool()
	data = d.opaque()
	return data, eof, decoded("READ", d)
}

// Write writes data to fh at off, made as durable as stable asks before
// the reply. Count may be short of len(data): the caller sends the rest.
// Sent again after a transport error it writes the same bytes again,
// which is harmless unless another client wrote there in between.
func (c *Client) Write(ctx context.Context, fh []byte, off uint64, data []byte, stable Stable) (WriteResult, error) {
	args := enc{}.opaque(fh).u64(off).u32(uint32(len(data))).u32(uint32(stable)).opaque(data)
	d, err := c.nfs(ctx, procWrite, "WRITE", args)
	if err != nil {
		return WriteResult{}, err
	}
	d.wcc()
	r := WriteResult{Count: d.u32(), Committed: Stable(d.u32()), Verifier: d.u64()}
	return r, decoded("WRITE", d)
}

// Commit makes every unstable write to fh durable and returns the
// server's write verifier: if it differs from the one those writes
// returned, the server restarted (or another took over) in between and
// they must be written again.
func (c *Client) Commit(ctx context.Context, fh []byte) (uint64, error) {
	d, err := c.nfs(ctx, procCommit, "COMMIT", enc{}.opaque(fh).u64(0).u32(0))
	if err != nil {
		return 0, err
	}
	d.wcc()
	verf := d.u64()
	return verf, decoded("COMMIT", d)
}

// Create creates the regular file name in dir with the permission bits
// mode and returns its handle. Unchecked takes an existing file and sets
// its mode (go-nfs also truncates it); Guarded fails with NFS3ERR_EXIST.
// Sent again after a transport error, a Guarded create
// that did succeed the first time fails with NFS3ERR_EXIST: only the
// caller can tell that from another client's file.
func (c *Client) Create(ctx context.Context, dir []byte, name string, how CreateMode, mode uint32) ([]byte, error) {
	return c.made(ctx, procCreate, "CREATE", enc{}.dirop(dir, name).u32(uint32(how)).sattr(SetAttr{Mode: &mode}))
}

// Mkdir creates the directory name in dir with the permission bits mode
// and returns its handle. Sent again after a transport error, one that
// did succeed the first time fails with NFS3ERR_EXIST.
func (c *Client) Mkdir(ctx context.Context, dir []byte, name string, mode uint32) ([]byte, error) {
	return c.made(ctx, procMkdir, "MKDIR", enc{}.dirop(dir, name).sattr(SetAttr{Mode: &mode}))
}

// Symlink creates the symlink name in dir pointing at target and returns
// its handle. Sent again after a transport error, one that did succeed
// the first time fails with NFS3ERR_EXIST.
func (c *Client) Symlink(ctx context.Context, dir []byte, name, target string) ([]byte, error) {
	return c.made(ctx, procSymlink, "SYMLINK", enc{}.dirop(dir, name).sattr(SetAttr{}).str(target))
}

// made makes a CREATE, MKDIR or SYMLINK call and returns the new
// object's handle.
func (c *Client) made(ctx context.Context, proc uint32, name string, args enc) ([]byte, error) {
	d, err := c.nfs(ctx, proc, name, args)
	if err != nil {
		return nil, err
	}
	if !d.bool() {
		if err := decoded(name, d); err != nil {
			return nil, err
		}
		// RFC 1813 lets a server leave it out (Linux then looks the name
		// up); go-nfs, the server this client serves, always sends it.
		return nil, &RPCError{Proc: name, Reason: "the server returned no handle for the new object"}
	}
	fh := d.opaque()
	return fh, decoded(name, d)
}

// Remove removes the non-directory name from dir. Sent again after a
// transport error, a remove that did succeed the first time fails with
// NFS3ERR_NOENT: only the caller can tell that from another client's.
func (c *Client) Remove(ctx context.Context, dir []byte, name string) error {
	_, err := c.nfs(ctx, procRemove, "REMOVE", enc{}.dirop(dir, name))
	return err
}

// Rmdir removes the empty directory name from dir. Sent again after a
// transport error, one that did succeed the first time fails with
// NFS3ERR_NOENT.
func (c *Client) Rmdir(ctx context.Context, dir []byte, name string) error {
	_, err := c.nfs(ctx, procRmdir, "RMDIR", enc{}.dirop(dir, name))
	return err
}

// Rename renames from in fromDir to to in toDir, replacing what to names.
// Sent again after a transport error, one that did succeed the first
// time fails with NFS3ERR_NOENT (from is gone).
func (c *Client) Rename(ctx context.Context, fromDir []byte, from string, toDir []byte, to string) error {
	_, err := c.nfs(ctx, procRename, "RENAME", enc{}.dirop(fromDir, from).dirop(toDir, to))
	return err
}

// ReadDirPlus lists the directory dir, "." and ".." left out, with a
// call per page, each continuing at the last cookie. A directory that
// changes between pages, or a new server that lists it otherwise, may
// fail it with NFS3ERR_BAD_COOKIE: the caller lists again.
func (c *Client) ReadDirPlus(ctx context.Context, dir []byte) ([]DirEntry, error) {
	const name = "READDIRPLUS"
	var out []DirEntry
	var cookie, verf uint64
	for {
		// dircount 8 KiB of names and cookies, maxcount 64 KiB in all.
		d, err := c.nfs(ctx, procReaddirplus, name, enc{}.opaque(dir).u64(cookie).u64(verf).u32(8192).u32(65536))
		if err != nil {
			return nil, err
		}
		d.postOpAttr()
		verf = d.u64()
		n := 0
		for d.bool() {
			e := DirEntry{Fileid: d.u64(), Name: string(d.opaque())}
			cookie = d.u64()
			e.Attr = d.postOpAttr()
			if d.bool() {
				e.Handle = d.opaque()
			}
			if e.Name != "." && e.Name != ".." {
				out = append(out, e)
			}
			n++
		}
		eof := d.bool()
		if err := decoded(name, d); err != nil {
			return nil, err
		}
		if eof {
			return out, nil
		}
		if n == 0 {
			return nil, &RPCError{Proc: name, Reason: "a page with no entry and no end of directory"}
		}
	}
}

// Fsstat returns the sizes of the filesystem that holds fh.
func (c *Client) Fsstat(ctx context.Context, fh []byte) (FSStat, error) {
	d, err := c.nfs(ctx, procFsstat, "FSSTAT", enc{}.opaque(fh))
	if err != nil {
		return FSStat{}, err
	}
	d.postOpAttr()
	s := FSStat{TotalBytes: d.u64(), FreeBytes: d.u64(), AvailBytes: d.u64(),
		TotalFiles: d.u64(), FreeFiles: d.u64(), AvailFiles: d.u64()}
	return s, decoded("FSSTAT", d)
}
