package config

import (
	"errors"
	"fmt"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// A problem is one thing wrong in a configuration file. Its message
// starts with the key path (cluster.interval); line is where that key is
// in the file, 0 when the file does not set it.
type problem struct {
	line int
	msg  string
}

func (p problem) String() string {
	if p.line == 0 {
		return p.msg
	}
	return fmt.Sprintf("line %d: %s", p.line, p.msg)
}

// problems are every problem of one file, sorted by line, so that one
// run of duet run --check shows them all.
type problems []problem

func (ps problems) Error() string {
	if len(ps) == 1 {
		return ps[0].String()
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%d problems:", len(ps))
	for _, p := range ps {
		b.WriteString("\n  " + p.String())
	}
	return b.String()
}

// checker walks the YAML tree beside the type it decodes into, to say
// what yaml.v3 says in Go terms ("field heartbeat_prot not found in type
// config.Cluster") with the key path and the fix instead.
type checker struct {
	problems []problem
	lines    map[string]int  // key path → line of the key
	bad      map[string]bool // key paths that did not decode: not validated again
}

func newChecker() *checker {
	return &checker{lines: map[string]int{}, bad: map[string]bool{}}
}

func (ck *checker) add(line int, path, format string, a ...any) {
	ck.problems = append(ck.problems, problem{line, showPath(path) + ": " + fmt.Sprintf(format, a...)})
	ck.bad[path] = true
}

func showPath(path string) string {
	if path == "" {
		return "the file"
	}
	return path
}

var durationType = reflect.TypeOf(time.Duration(0))

// walk checks node n, at key path, against type t.
func (ck *checker) walk(n *yaml.Node, t reflect.Type, path string) {
	if n.Kind == yaml.AliasNode {
		n = n.Alias
	}
	if n.Kind == yaml.ScalarNode && n.Tag == "!!null" {
		return // nothing set: the default applies
	}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch {
	case t.Kind() == reflect.Struct:
		if n.Kind != yaml.MappingNode {
			ck.wrongKind(n, t, path)
			return
		}
		ck.walkMapping(n, t, path)
	case t.Kind() == reflect.Slice:
		if n.Kind != yaml.SequenceNode {
			ck.wrongKind(n, t, path)
			return
		}
		for i, e := range n.Content {
			p := fmt.Sprintf("%s[%d]", path, i)
			ck.lines[p] = e.Line
			ck.walk(e, t.Elem(), p)
		}
	default:
		if n.Kind != yaml.ScalarNode {
			ck.wrongKind(n, t, path)
			return
		}
		// yaml.v3 itself judges the value, so that what passes here
		// decodes the same below.
		if err := n.Decode(reflect.New(t).Interface()); err != nil {
			ck.wrongKind(n, t, path)
		}
	}
}

// walkMapping checks the keys of mapping n against struct t. Merged
// mappings (<<: *anchor) are left to yaml.v3's own errors.
func (ck *checker) walkMapping(n *yaml.Node, t reflect.Type, path string) {
	fields := yamlFields(t)
	seen := map[string]int{} // key → line
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		if k.Tag == "!!merge" {
			continue
		}
		p := k.Value
		if path != "" {
			p = path + "." + k.Value
		}
		f, ok := fields[k.Value]
		if !ok {
			names := make([]string, 0, len(fields))
			for name := range fields {
				names = append(names, name)
			}
			hint := ""
			if s := suggest(k.Value, names); s != "" {
				hint = " (did you mean " + s + "?)"
			}
			ck.add(k.Line, p, "unknown field%s", hint)
			continue
		}
		if first, dup := seen[k.Value]; dup {
			// yaml.v3 then decodes nothing of this mapping.
			ck.add(k.Line, p, "set twice (first at line %d): keep one", first)
			ck.bad[path] = true
			continue
		}
		seen[k.Value] = k.Line
		ck.lines[p] = k.Line
		ck.walk(v, f, p)
	}
}

// wrongKind reports that n is not the t wanted at path.
func (ck *checker) wrongKind(n *yaml.Node, t reflect.Type, path string) {
	want := wanted(t)
	switch n.Kind {
	case yaml.MappingNode:
		ck.add(n.Line, path, "want %s, not a mapping (key: value lines)", want)
	case yaml.SequenceNode:
		ck.add(n.Line, path, "want %s, not a list", want)
	default:
		ck.add(n.Line, path, "%q is not %s", n.Value, want)
	}
}

// wanted describes what a value of type t is, for an operator.
func wanted(t reflect.Type) string {
	switch t.Kind() {
	case reflect.Struct:
		return "a mapping (key: value lines)"
	case reflect.Slice:
		return "a list"
	case reflect.Bool:
		return "true or false"
	case reflect.String:
		return "a single value"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		if t == durationType {
			return "a duration (e.g. 200ms, 1.5s)"
		}
		return "a whole number"
	}
	return "a " + t.String()
}

// yamlFields maps the YAML keys of struct t to their field types.
func yamlFields(t reflect.Type) map[string]reflect.Type {
	fields := map[string]reflect.Type{}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		switch name {
		case "-":
			continue
		case "":
			name = strings.ToLower(f.Name)
		}
		fields[name] = f.Type
	}
	return fields
}

// suggest returns the name among names that key was most likely meant to
// be: the closest by edit distance (ignoring case, '_' and '-'), if close
// (a typo or two), or the only name key is a prefix of, or the longest
// name that is a prefix of key ("interval_ms": interval). "" if none.
func suggest(key string, names []string) string {
	norm := func(s string) string { return strings.NewReplacer("_", "", "-", "").Replace(strings.ToLower(s)) }
	k := norm(key)
	var best []string
	bestD := 2
	for _, n := range names {
		d := distance(k, norm(n))
		if d > 2 || d > 1 && len(norm(n)) <= 4 {
			continue // two edits turn most short names into others
		}
		switch {
		case d < bestD:
			best, bestD = []string{n}, d
		case d == bestD:
			best = append(best, n)
		}
	}
	if len(best) == 0 && len(k) >= 3 {
		var longer []string
		shorter := ""
		for _, n := range names {
			nn := norm(n)
			if strings.HasPrefix(nn, k) {
				longer = append(longer, n)
			}
			if strings.HasPrefix(k, nn) && len(n) > len(shorter) {
				shorter = n
			}
		}
		switch {
		case len(longer) == 1:
			best = longer
		case len(longer) == 0 && shorter != "":
			best = []string{shorter}
		}
	}
	sort.Strings(best)
	return strings.Join(best, " or ")
}

// distance is the optimal string alignment distance between a and b:
// insertions, deletions, substitutions and swaps of neighbours count one.
func distance(a, b string) int {
	d := make([][]int, len(a)+1)
	for i := range d {
		d[i] = make([]int, len(b)+1)
		d[i][0] = i
	}
	for j := range d[0] {
		d[0][j] = j
	}
	for i := 1; i <= len(a); i++ {
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			d[i][j] = min(d[i-1][j]+1, d[i][j-1]+1, d[i-1][j-1]+cost)
			if i > 1 && j > 1 && a[i-1] == b[j-2] && a[i-2] == b[j-1] {
				d[i][j] = min(d[i][j], d[i-2][j-2]+1)
			}
		}
	}
	return d[len(a)][len(b)]
}

var yamlLineRE = regexp.MustCompile(`^line (\d+): (.*)$`)

// decode decodes b into c as yaml.v3 does with unknown fields refused, and
// returns every problem it met: with key paths and the fix where the
// checker recognises it, yaml.v3's own words otherwise. A syntax error is
// returned as err: nothing after it can be read.
func decode(b []byte, c *Config) (*checker, error) {
	ck := newChecker()
	var root yaml.Node
	if err := yaml.Unmarshal(b, &root); err != nil {
		return nil, err
	}
	if len(root.Content) == 0 {
		return ck, nil // an empty file: validation names what is missing
	}
	ck.walk(root.Content[0], reflect.TypeOf(*c), "")
	dec := yaml.NewDecoder(strings.NewReader(string(b)))
	dec.KnownFields(true)
	err := dec.Decode(c)
	var te *yaml.TypeError
	if !errors.As(err, &te) {
		return ck, err
	}
	covered := map[int]bool{}
	for _, p := range ck.problems {
		covered[p.line] = true
	}
	for _, e := range te.Errors {
		m := yamlLineRE.FindStringSubmatch(e)
		if m == nil {
			ck.problems = append(ck.problems, problem{msg: e})
			continue
		}
		if line, _ := strconv.Atoi(m[1]); !covered[line] {
			ck.problems = append(ck.problems, problem{line, m[2]})
		}
	}
	return ck, nil
}

// validation turns Validate's errors into problems: each starts with its
// key path, which gives its line. One about a key that did not decode,
// or inside one, is dropped: its value is a default, not the file's.
func (ck *checker) validation(errs []error) {
	for _, err := range errs {
		msg := err.Error()
		path := msg[:strings.IndexFunc(msg+" ", func(r rune) bool { return r == ' ' || r == ':' })]
		line, skip := 0, false
		for p, ok := path, true; ok; p, ok = parent(p) {
			skip = skip || ck.bad[p]
			if line == 0 {
				line = ck.lines[p]
			}
		}
		if !skip {
			ck.problems = append(ck.problems, problem{line, msg})
		}
	}
}

// parent returns the key path that holds path: cluster for
// cluster.interval, replicate for replicate[0], "" (the whole file) for
// cluster.
func parent(path string) (string, bool) {
	if path == "" {
		return "", false
	}
	return path[:max(strings.LastIndexAny(path, ".["), 0)], true
}

// sorted returns the problems by line, those not tied to a line last.
func (ck *checker) sorted() problems {
	ps := problems(ck.problems)
	sort.SliceStable(ps, func(i, j int) bool {
		li, lj := ps[i].line, ps[j].line
		return li != 0 && (lj == 0 || li < lj)
	})
	return ps
}
