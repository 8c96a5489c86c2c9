package cniconf

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
)

// PluginType is the CNI type, and binary name, of pktmeta. A plugin entry
// of this type is ours.
const PluginType = "pktmeta"

// member is one key of a JSON object, with its value as written.
type member struct {
	key string
	val json.RawMessage
}

// object is a JSON object that keeps its keys in order and its values as
// raw JSON, so that what we do not touch is written back as it was.
type object []member

// parseObject decodes a JSON object. Like encoding/json, it rejects
// anything after the object but whitespace.
func parseObject(b []byte) (object, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, errors.New("not a JSON object")
	}
	var o object
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, err
		}
		key, ok := tok.(string)
		if !ok {
			return nil, fmt.Errorf("unexpected %v", tok)
		}
		var val json.RawMessage
		if err := dec.Decode(&val); err != nil {
			return nil, err
		}
		o = append(o, member{key, val})
	}
	if _, err := dec.Token(); err != nil {
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("data after the JSON object")
	}
	return o, nil
}

// get returns the value of key; like encoding/json, the last one when the
// key is there twice.
func (o object) get(key string) (json.RawMessage, bool) {
	for i := len(o) - 1; i >= 0; i-- {
		if o[i].key == key {
			return o[i].val, true
		}
	}
	return nil, false
}

// set replaces the value of key, or appends the key.
func (o object) set(key string, val json.RawMessage) object {
	for i := len(o) - 1; i >= 0; i-- {
		if o[i].key == key {
			o[i].val = val
			return o
		}
	}
	return append(o, member{key, val})
}

// without returns o minus every occurrence of the keys.
func (o object) without(keys ...string) object {
	var out object
next:
	for _, m := range o {
		for _, k := range keys {
			if m.key == k {
				continue next
			}
		}
		out = append(out, m)
	}
	return out
}

// compact writes o as compact JSON.
func (o object) compact() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, m := range o {
		if i > 0 {
			b.WriteByte(',')
		}
		k, err := marshal(m.key)
		if err != nil {
			return nil, err
		}
		b.Write(k)
		b.WriteByte(':')
		if err := json.Compact(&b, m.val); err != nil {
			return nil, fmt.Errorf("key %q: %w", m.key, err)
		}
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

// format renders o the way we write config files: two-space indentation
// and a final newline.
func (o object) format() ([]byte, error) {
	c, err := o.compact()
	if err != nil {
		return nil, err
	}
	var b bytes.Buffer
	if err := json.Indent(&b, c, "", "  "); err != nil {
		return nil, err
	}
	b.WriteByte('\n')
	return b.Bytes(), nil
}

// marshal is json.Marshal without the HTML escaping of <, > and &, which a
// config file has no use for.
func marshal(v any) ([]byte, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(b.Bytes(), []byte("\n")), nil
}

// rawArray renders raw values as a compact JSON array.
func rawArray(vals []json.RawMessage) (json.RawMessage, error) {
	var b bytes.Buffer
	b.WriteByte('[')
	for i, v := range vals {
		if i > 0 {
			b.WriteByte(',')
		}
		if err := json.Compact(&b, v); err != nil {
			return nil, err
		}
	}
	b.WriteByte(']')
	return b.Bytes(), nil
}

// pluginType is the "type" of a plugin entry, matched the way libcni
// matches it (encoding/json, so the key is case-insensitive).
func pluginType(raw json.RawMessage) string {
	var p struct {
		Type string `json:"type"`
	}
	if json.Unmarshal(raw, &p) != nil {
		return ""
	}
	return p.Type
}

func isOurs(raw json.RawMessage) bool { return pluginType(raw) == PluginType }

// jsonEqual compares two JSON values semantically: key order and
// whitespace do not matter, number spellings do.
func jsonEqual(a, b json.RawMessage) bool {
	var va, vb any
	da := json.NewDecoder(bytes.NewReader(a))
	da.UseNumber()
	db := json.NewDecoder(bytes.NewReader(b))
	db.UseNumber()
	if da.Decode(&va) != nil || db.Decode(&vb) != nil {
		return false
	}
	return reflect.DeepEqual(va, vb)
}

// normalizeEntry checks the caller's entry and renders it as compact JSON.
func normalizeEntry(entry any) (json.RawMessage, error) {
	if entry == nil {
		return nil, errors.New("no plugin entry given")
	}
	var raw []byte
	switch e := entry.(type) {
	case json.RawMessage:
		raw = e
	case []byte:
		raw = e
	case string:
		raw = []byte(e)
	default:
		b, err := marshal(entry)
		if err != nil {
			return nil, fmt.Errorf("plugin entry: %w", err)
		}
		raw = b
	}
	o, err := parseObject(raw)
	if err != nil {
		return nil, fmt.Errorf("plugin entry: %w", err)
	}
	if t := pluginType(raw); t != PluginType {
		return nil, fmt.Errorf("plugin entry: type is %q, want %q", t, PluginType)
	}
	// "type" first, as CNI configs are written (json.Marshal sorts a
	// map's keys).
	if t, ok := o.get("type"); ok {
		o = append(object{{"type", t}}, o.without("type")...)
	}
	return o.compact()
}

// conflist is a parsed .conflist: its top-level keys, and its plugins.
type conflist struct {
	top     object
	plugins []json.RawMessage
}

func parseConflist(b []byte) (*conflist, error) {
	top, err := parseObject(b)
	if err != nil {
		return nil, err
	}
	raw, ok := top.get("plugins")
	if !ok {
		return nil, errors.New(`no "plugins" list`)
	}
	var plugins []json.RawMessage
	if err := json.Unmarshal(raw, &plugins); err != nil {
		return nil, fmt.Errorf(`"plugins": %w`, err)
	}
	return &conflist{top: top, plugins: plugins}, nil
}

func (c *conflist) format() ([]byte, error) {
	arr, err := rawArray(c.plugins)
	if err != nil {
		return nil, err
	}
	return c.top.set("plugins", arr).format()
}

// ours counts our entries.
func (c *conflist) ours() int {
	n := 0
	for _, p := range c.plugins {
		if isOurs(p) {
			n++
		}
	}
	return n
}

// hasEntry reports whether the plugins end with exactly one entry of ours,
// equal to entry.
func (c *conflist) hasEntry(entry json.RawMessage) bool {
	n := len(c.plugins)
	return n > 0 && c.ours() == 1 && isOurs(c.plugins[n-1]) && jsonEqual(c.plugins[n-1], entry)
}

// strip removes our entries.
func (c *conflist) strip() {
	out := c.plugins[:0:0]
	for _, p := range c.plugins {
		if !isOurs(p) {
			out = append(out, p)
		}
	}
	c.plugins = out
}

// withEntry returns the conflist in b with entry as its last plugin and no
// other entry of ours, and whether that differs from b.
func withEntry(b []byte, entry json.RawMessage) ([]byte, bool, error) {
	c, err := parseConflist(b)
	if err != nil {
		return nil, false, err
	}
	if c.hasEntry(entry) {
		return b, false, nil
	}
	c.strip()
	c.plugins = append(c.plugins, entry)
	out, err := c.format()
	return out, true, err
}

// withoutEntry returns the conflist in b without our entries, and whether
// it had any. A list that would be left empty is an error: a conflist
// without plugins is not a valid config.
func withoutEntry(b []byte) ([]byte, bool, error) {
	c, err := parseConflist(b)
	if err != nil {
		return nil, false, err
	}
	if c.ours() == 0 {
		return b, false, nil
	}
	c.strip()
	if len(c.plugins) == 0 {
		return nil, false, errors.New("pktmeta is its only plugin")
	}
	out, err := c.format()
	return out, true, err
}

// convert turns a single-plugin config (.conf, .json) into a conflist whose
// plugins are that plugin, minus cniVersion and name, and entry.
func convert(b []byte, entry json.RawMessage) ([]byte, error) {
	conf, err := parseObject(b)
	if err != nil {
		return nil, err
	}
	// As libcni's ConfListFromConf: both keys, even when the conf has
	// none (a conflist without "name" is invalid, a .conf is not).
	var top object
	for _, k := range []string{"cniVersion", "name"} {
		v, ok := conf.get(k)
		if !ok {
			v = json.RawMessage(`""`)
		}
		top = append(top, member{k, v})
	}
	plugin, err := conf.without("cniVersion", "name").compact()
	if err != nil {
		return nil, err
	}
	if isOurs(plugin) {
		return nil, errors.New("the config is pktmeta itself, not a primary CNI")
	}
	c := &conflist{top: top, plugins: []json.RawMessage{plugin, entry}}
	return c.format()
}
