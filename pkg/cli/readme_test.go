package cli

import (
	"os"
	"strings"
	"testing"
)

// readmeCommands are the duet command lines in the README's code blocks,
// continuation lines joined, comments and shell operators removed.
func readmeCommands(t *testing.T) []string {
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	var cmds []string
	in, joined := false, ""
	for line := range strings.Lines(string(b)) {
		line = strings.TrimSpace(line)
		if strings.HasPrefix(line, "```") {
			in = !in
			continue
		}
		if !in {
			continue
		}
		if c, ok := strings.CutSuffix(line, "\\"); ok {
			joined += c + " "
			continue
		}
		line, joined = joined+line, ""
		if i := strings.Index(line, " #"); i >= 0 {
			line = line[:i]
		}
		for _, seg := range strings.FieldsFunc(line, func(r rune) bool { return r == '&' || r == ';' || r == '|' }) {
			if seg = strings.TrimSpace(seg); strings.HasPrefix(seg, "duet ") {
				cmds = append(cmds, seg)
			}
		}
	}
	return cmds
}

// Every duet command the README shows in a code block exists with the
// flags it gives: a newcomer copies them as they are.
func TestREADMECommands(t *testing.T) {
	cmds := readmeCommands(t)
	if len(cmds) < 10 {
		t.Fatalf("found %d duet commands in the README's code blocks: %q", len(cmds), cmds)
	}
	for _, line := range cmds {
		if strings.Contains(line, "…") {
			continue // an elided example, not a command to copy
		}
		root := New(IOStreams{})
		root.InitDefaultCompletionCmd()
		cmd, args, err := root.Find(strings.Fields(line)[1:])
		if err == nil {
			err = cmd.ParseFlags(args)
		}
		if err == nil {
			err = cmd.ValidateArgs(cmd.Flags().Args())
		}
		if err == nil && !cmd.Runnable() {
			t.Errorf("README: %q: %s does not run by itself", line, cmd.CommandPath())
		}
		if err != nil {
			t.Errorf("README: %q: %v", line, err)
		}
	}
}
