// Package config reads and checks duet's YAML configuration. Every error
// names the field at fault and what would fix it.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"gopkg.in/yaml.v3"
)

// Roles a node can be started in.
const (
	RolePrimary   = "primary"
	RoleSecondary = "secondary"
)

// Config is one node's configuration.
type Config struct {
	// Node names this node in logs and status.
	Node string `yaml:"node"`
	// Role is primary or secondary.
	Role string `yaml:"role"`
	// Listen is the address peers and verify connect to (host:port).
	Listen string `yaml:"listen"`
	// Peer is the other node's listen address.
	Peer string `yaml:"peer"`
	// Key is the pre-shared cluster key; KeyFile names a file holding it.
	Key     string `yaml:"key"`
	KeyFile string `yaml:"key_file"`
	// StateDir holds replica progress and the control socket.
	StateDir string `yaml:"state_dir"`
	// Socket is the control socket; default <state_dir>/duet.sock.
	Socket string `yaml:"socket"`
	// RingBufferKiB sizes the capture ring buffer (a power of two, at
	// least 4). A record is 56 bytes; when the buffer fills, the files
	// concerned are rescanned.
	RingBufferKiB int `yaml:"ring_buffer_kib"`
	// Replicate lists the replicated directories.
	Replicate []Replicate `yaml:"replicate"`
}

// Replicate is one replicated directory.
type Replicate struct {
	// Name identifies the directory on both nodes; default: base name.
	Name string `yaml:"name"`
	// Path is the local directory.
	Path string `yaml:"path"`
}

// Defaults.
const (
	DefaultStateDir = "/var/lib/duet"
	DefaultRingKiB  = 16 << 10
	DefaultPort     = "7788"
)

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// Load reads, defaults and validates the file at path.
func Load(path string) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	c, err := Parse(b)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

// Parse decodes YAML strictly (unknown fields are errors), applies
// defaults and validates.
func Parse(b []byte) (*Config, error) {
	var c Config
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil {
		return nil, fmt.Errorf("parsing YAML: %w", err)
	}
	c.defaults()
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return &c, nil
}

func (c *Config) defaults() {
	if c.StateDir == "" {
		c.StateDir = DefaultStateDir
	}
	if c.Socket == "" {
		c.Socket = filepath.Join(c.StateDir, "duet.sock")
	}
	if c.RingBufferKiB == 0 {
		c.RingBufferKiB = DefaultRingKiB
	}
	for i := range c.Replicate {
		if c.Replicate[i].Name == "" {
			c.Replicate[i].Name = filepath.Base(filepath.Clean(c.Replicate[i].Path))
		}
	}
}

// Validate checks every field. It does not touch the network.
func (c *Config) Validate() error {
	var errs []error
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	if !nameRE.MatchString(c.Node) {
		bad("node %q: must be 1-63 letters, digits, '.', '_' or '-'", c.Node)
	}
	if c.Role != RolePrimary && c.Role != RoleSecondary {
		bad("role %q: must be %q or %q", c.Role, RolePrimary, RoleSecondary)
	}
	for field, addr := range map[string]string{"listen": c.Listen, "peer": c.Peer} {
		if _, port, err := net.SplitHostPort(addr); err != nil || port == "" {
			bad("%s %q: want host:port, e.g. 10.250.0.2:%s", field, addr, DefaultPort)
		}
	}
	if c.Key == "" && c.KeyFile == "" {
		bad("key: set key or key_file (the same secret on both nodes)")
	}
	if c.Key != "" && c.KeyFile != "" {
		bad("key and key_file are both set: keep one")
	}
	if k := c.RingBufferKiB; k < 4 || k > 1<<20 || k&(k-1) != 0 {
		bad("ring_buffer_kib %d: must be a power of two between 4 and 1048576", k)
	}
	if !filepath.IsAbs(c.StateDir) {
		bad("state_dir %q: must be an absolute path", c.StateDir)
	}
	if len(c.Replicate) == 0 {
		bad("replicate: list at least one directory")
	}
	names := map[string]int{}
	for i, r := range c.Replicate {
		if !filepath.IsAbs(r.Path) {
			bad("replicate[%d].path %q: must be an absolute path", i, r.Path)
			continue
		}
		if !nameRE.MatchString(r.Name) {
			bad("replicate[%d].name %q: must be 1-63 letters, digits, '.', '_' or '-'", i, r.Name)
		}
		if j, dup := names[r.Name]; dup {
			bad("replicate[%d].name %q: already used by replicate[%d]", i, r.Name, j)
		}
		names[r.Name] = i
		if st, err := os.Stat(r.Path); err != nil {
			bad("replicate[%d].path %q: %v", i, r.Path, unwrapPathErr(err))
		} else if !st.IsDir() {
			bad("replicate[%d].path %q: not a directory", i, r.Path)
		}
		sd := filepath.Clean(c.StateDir)
		if rp := filepath.Clean(r.Path); sd == rp || strings.HasPrefix(sd, rp+"/") {
			bad("state_dir %q: must not be inside replicate[%d].path %q", c.StateDir, i, r.Path)
		}
	}
	return errors.Join(errs...)
}

func unwrapPathErr(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// ReadKey returns the cluster key.
func (c *Config) ReadKey() ([]byte, error) {
	if c.Key != "" {
		return []byte(c.Key), nil
	}
	b, err := os.ReadFile(c.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("key_file: %w", err)
	}
	k := bytes.TrimSpace(b)
	if len(k) < 16 {
		return nil, fmt.Errorf("key_file %q: key of %d bytes is too short (want at least 16)", c.KeyFile, len(k))
	}
	return k, nil
}
