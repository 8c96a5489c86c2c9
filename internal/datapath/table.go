package datapath

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"runtime"

	"github.com/cilium/ebpf"
)

// The connection table's layout (bpf/include/pktmeta.h): F14-style chunks
// of chunkSlots slots in two arrays, one 64-bit word per chunk.
const (
	tableVersion      = 1 // PKTMETA_TABLE_VERSION
	chunkSlots        = 7 // PKTMETA_CHUNK_SLOTS
	chunkProbes       = 8 // PKTMETA_CHUNK_PROBES
	chunkOverflowMask = 0x7f << 56
	slotKindMask      = 3 // PKTMETA_SLOT_KIND_MASK
	slotLive          = 2 // PKTMETA_SLOT_LIVE
	slotRewriting     = 3 // PKTMETA_SLOT_REWRITING
	jhashInitval      = 0xdeadbeef

	// tableLoadNum/tableLoadDen is how full the table is at its
	// capacity (maxConnections): 3/5. The slots past a chunk that an
	// insert may use are bounded (PKTMETA_CHUNK_PROBES), so a table run
	// near full refuses some inserts before it is; at three fifths
	// refusals are rare (docs/BENCHMARKS.md, the table study), and a
	// table may hold more than its capacity while they stay rare.
	tableLoadNum = 3
	tableLoadDen = 5
)

// Results of the table's writes (TABLE_* in bpf/table.h).
const (
	tableDone   = 0
	tableExists = 1
	tableFull   = 2
	tableBusy   = 3
	tableGone   = 4
)

// Operations of pktmeta_table_write (PKTMETA_TABLE_OP_*).
const (
	tableOpInsert = 1
	tableOpRemove = 2
	tableOpMagic  = 0x706f656c62746d70
)

// MaxCapacity bounds maxConnections: the slots array stays under 4 GiB
// (27 962 027 slots of 152 bytes at 2^24), since kernels before 5.19
// compute an array element's offset in 32 bits for lookups from
// userspace and for bpf_for_each_map_elem.
const MaxCapacity = 1 << 24

// orderedReads says whether the table's readers need fully ordered reads
// of a slot's state, and its writers fully ordered changes of it
// (pktmeta_ordered_reads in pktmeta.h): everywhere but on x86-64, whose
// loads never pass loads and whose stores are seen in program order (a
// 32-bit x86 JIT would write the 64-bit state in two halves).
func orderedReads() bool { return runtime.GOARCH != "amd64" }

// tableChunks is how many chunks a table for capacity connections has.
func tableChunks(capacity uint32) uint32 {
	slots := (uint64(capacity)*tableLoadDen + tableLoadNum - 1) / tableLoadNum
	return uint32(max(1, (slots+chunkSlots-1)/chunkSlots))
}

// tableInfo is the table's pinned description, read once per handle.
type tableInfo struct {
	chunks, seed, capacity uint32
}

// initTable writes the description of tables that were just made, with a
// random seed; it leaves one that has it alone.
func initTable(info, chunks, slots *ebpf.Map, capacity uint32) error {
	var raw bpfPktmetaTableInfo
	if err := info.Lookup(uint32(0), &raw); err != nil {
		return fmt.Errorf("read %s: %w", mapTable, err)
	}
	if raw.Version != 0 {
		return nil
	}
	var seed [4]byte
	if _, err := rand.Read(seed[:]); err != nil {
		return fmt.Errorf("connection table seed: %w", err)
	}
	raw = bpfPktmetaTableInfo{
		Version:  tableVersion,
		N_chunks: chunks.MaxEntries(),
		Seed:     binary.NativeEndian.Uint32(seed[:]),
		Capacity: capacity,
	}
	if slots.MaxEntries() != raw.N_chunks*chunkSlots {
		return fmt.Errorf("connection table: %d chunks but %d slots", raw.N_chunks, slots.MaxEntries())
	}
	if err := info.Update(uint32(0), &raw, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write %s: %w", mapTable, err)
	}
	return nil
}

// readTable reads the table's description and checks it against the maps.
func readTable(info, chunks, slots *ebpf.Map) (tableInfo, error) {
	var raw bpfPktmetaTableInfo
	if err := info.Lookup(uint32(0), &raw); err != nil {
		return tableInfo{}, fmt.Errorf("read %s: %w", mapTable, err)
	}
	if raw.Version != tableVersion {
		return tableInfo{}, fmt.Errorf("pinned %s has table version %d, want %d", mapTable, raw.Version, tableVersion)
	}
	if raw.N_chunks != chunks.MaxEntries() || uint64(raw.N_chunks)*chunkSlots != uint64(slots.MaxEntries()) {
		return tableInfo{}, fmt.Errorf("pinned %s says %d chunks, but %s has %d and %s %d slots",
			mapTable, raw.N_chunks, mapChunks, chunks.MaxEntries(), mapSlots, slots.MaxEntries())
	}
	return tableInfo{chunks: raw.N_chunks, seed: raw.Seed, capacity: raw.Capacity}, nil
}

// Capacity is the number of connections the table was sized for
// (maxConnections when it was made).
func (d *Datapath) Capacity() uint32 { return d.table.capacity }

// tupleHash is pktmeta_hash() of pktmeta.h: jhash over both endpoints in
// order, the ports and the protocol, so a tuple and its reverse agree.
func tupleHash(k *bpfPktmetaTuple, seed uint32) uint32 {
	var s, d [4]uint32
	for i := range 4 {
		s[i] = binary.NativeEndian.Uint32(k.Saddr[4*i:])
		d[i] = binary.NativeEndian.Uint32(k.Daddr[4*i:])
	}
	sp, dp := uint32(k.Sport), uint32(k.Dport)
	lo, hi, ports := s, d, sp<<16|dp
	swap := sp > dp
	for i := range 4 {
		if s[i] != d[i] {
			swap = s[i] > d[i]
			break
		}
	}
	if swap {
		lo, hi, ports = d, s, dp<<16|sp
	}
	a := uint32(jhashInitval + 10<<2 + seed)
	b, c := a, a
	a += lo[0]
	b += lo[1]
	c += lo[2]
	a, b, c = jhashMix(a, b, c)
	a += lo[3]
	b += hi[0]
	c += hi[1]
	a, b, c = jhashMix(a, b, c)
	a += hi[2]
	b += hi[3]
	c += ports
	a, b, c = jhashMix(a, b, c)
	a += uint32(k.Proto)
	return jhashFinal(a, b, c)
}

func jhashMix(a, b, c uint32) (uint32, uint32, uint32) {
	a -= c
	a ^= bits.RotateLeft32(c, 4)
	c += b
	b -= a
	b ^= bits.RotateLeft32(a, 6)
	a += c
	c -= b
	c ^= bits.RotateLeft32(b, 8)
	b += a
	a -= c
	a ^= bits.RotateLeft32(c, 16)
	c += b
	b -= a
	b ^= bits.RotateLeft32(a, 19)
	a += c
	c -= b
	c ^= bits.RotateLeft32(b, 4)
	b += a
	return a, b, c
}

func jhashFinal(a, b, c uint32) uint32 {
	c ^= b
	c -= bits.RotateLeft32(b, 14)
	a ^= c
	a -= bits.RotateLeft32(c, 11)
	b ^= a
	b -= bits.RotateLeft32(a, 25)
	c ^= b
	c -= bits.RotateLeft32(b, 16)
	a ^= c
	a -= bits.RotateLeft32(c, 4)
	b ^= a
	b -= bits.RotateLeft32(a, 14)
	c ^= b
	c -= bits.RotateLeft32(b, 24)
	return c
}

// homeAndTag are a hash's home chunk and tag (pktmeta_home_chunk(),
// pktmeta_tag()).
func homeAndTag(h, chunks uint32) (uint32, uint8) {
	tag := uint8(h)
	if tag == 0 {
		tag = 1
	}
	return uint32(uint64(h) * uint64(chunks) >> 32), tag
}

// errChanging: a slot kept changing while it was read.
var errChanging = errors.New("record keeps changing while read")

// readSlot reads slot idx until two reads in a row agree byte for byte
// (the kernel copies an array value without a lock, and every write of a
// slot moves its state, so two equal copies are one entry).
func (d *Datapath) readSlot(idx uint32, s *bpfPktmetaSlot) error {
	if err := d.SlotsMap.Lookup(idx, s); err != nil {
		return fmt.Errorf("read slot %d: %w", idx, err)
	}
	for range 8 {
		var again bpfPktmetaSlot
		if err := d.SlotsMap.Lookup(idx, &again); err != nil {
			return fmt.Errorf("read slot %d: %w", idx, err)
		}
		if again == *s {
			return nil
		}
		*s = again
	}
	return errChanging
}

// findSlot walks key's chunks the way pktmeta_find_slot() does and reads
// the LIVE slot holding key. ebpf.ErrKeyNotExist when there is none,
// errChanging when a slot that may be it kept changing, or its record was
// being rewritten.
func (d *Datapath) findSlot(key *bpfPktmetaTuple, s *bpfPktmetaSlot) error {
	t := d.table
	if t.chunks == 0 {
		return ebpf.ErrKeyNotExist
	}
	h := tupleHash(key, t.seed)
	c, tag := homeAndTag(h, t.chunks)
	changing := false
	for range chunkProbes {
		var w uint64
		if err := d.ChunksMap.Lookup(c, &w); err != nil {
			return fmt.Errorf("read chunk %d: %w", c, err)
		}
		for i := range uint32(chunkSlots) {
			if uint8(w>>(8*i)) != tag {
				continue
			}
			err := d.readSlot(c*chunkSlots+i, s)
			if errors.Is(err, errChanging) {
				// Maybe another tuple's slot: look on.
				changing = true
				continue
			}
			if err != nil {
				return err
			}
			if s.Key != *key {
				continue
			}
			switch s.State & slotKindMask {
			case slotLive:
				return nil
			case slotRewriting:
				changing = true
			}
		}
		if w&chunkOverflowMask == 0 {
			break
		}
		c = (c + 1) % t.chunks
	}
	if changing {
		return errChanging
	}
	return ebpf.ErrKeyNotExist
}

// chunkWords reads every chunk's word, in batches where the kernel has
// them.
func (d *Datapath) chunkWords() ([]uint64, error) {
	n := d.ChunksMap.MaxEntries()
	words := make([]uint64, n)
	keys := make([]uint32, n)
	var cursor ebpf.MapBatchCursor
	got, err := d.ChunksMap.BatchLookup(&cursor, keys, words, nil)
	if err == nil || errors.Is(err, ebpf.ErrKeyNotExist) {
		if got != int(n) {
			return nil, fmt.Errorf("read %s: %d of %d chunks", mapChunks, got, n)
		}
		return words, nil
	}
	if !errors.Is(err, ebpf.ErrNotSupported) {
		return nil, fmt.Errorf("read %s: %w", mapChunks, err)
	}
	for c := range n {
		if err := d.ChunksMap.Lookup(c, &words[c]); err != nil {
			return nil, fmt.Errorf("read %s: %w", mapChunks, err)
		}
	}
	return words, nil
}

// sparseShare: liveSlots reads tagged slots one by one while at most this
// share of the slots is tagged, and the whole table otherwise.
const sparseShare = 8

// liveSlots calls fn with every slot that holds one LIVE entry. It reads
// the chunks' words first; where few slots are tagged, it reads those
// slots one by one (readSlot), and otherwise the whole table in batches,
// each batch twice, keeping a slot only where its state is the same in
// both (every write moves it): a copy that raced a write is never taken
// for a record.
func (d *Datapath) liveSlots(fn func(s *bpfPktmetaSlot)) error {
	words, err := d.chunkWords()
	if err != nil {
		return err
	}
	var tagged []uint32
	for c, w := range words {
		for i := range uint32(chunkSlots) {
			if uint8(w>>(8*i)) != 0 {
				tagged = append(tagged, uint32(c)*chunkSlots+i)
			}
		}
	}
	if len(tagged) > int(d.SlotsMap.MaxEntries()/sparseShare) {
		return d.liveSlotsBatched(fn)
	}
	for _, idx := range tagged {
		if err := d.visitSlot(idx, fn); err != nil {
			return err
		}
	}
	return nil
}

// visitSlot reads slot idx (readSlot) and calls fn with it if it holds a
// LIVE entry; a slot that kept changing while it was read is passed by.
func (d *Datapath) visitSlot(idx uint32, fn func(s *bpfPktmetaSlot)) error {
	var s bpfPktmetaSlot
	err := d.readSlot(idx, &s)
	if errors.Is(err, errChanging) {
		return nil
	}
	if err != nil {
		return err
	}
	if s.State&slotKindMask == slotLive {
		fn(&s)
	}
	return nil
}

// liveSlotsBatched is liveSlots reading the whole table.
func (d *Datapath) liveSlotsBatched(fn func(s *bpfPktmetaSlot)) error {
	const batch = 4096
	keys, keys2 := make([]uint32, batch), make([]uint32, batch)
	first, again := make([]bpfPktmetaSlot, batch), make([]bpfPktmetaSlot, batch)
	var c1, c2 ebpf.MapBatchCursor
	for {
		n, err := d.SlotsMap.BatchLookup(&c1, keys, first, nil)
		if errors.Is(err, ebpf.ErrNotSupported) {
			return d.liveSlotsOneByOne(fn)
		}
		if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("read %s: %w", mapSlots, err)
		}
		n2, err2 := d.SlotsMap.BatchLookup(&c2, keys2, again, nil)
		if err2 != nil && !errors.Is(err2, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("read %s: %w", mapSlots, err2)
		}
		if n2 != n {
			return fmt.Errorf("read %s: two reads of one batch returned %d and %d slots", mapSlots, n, n2)
		}
		for i := range n {
			if keys[i] == keys2[i] && first[i].State&slotKindMask == slotLive && first[i].State == again[i].State {
				fn(&first[i])
			}
		}
		if err != nil {
			return nil // ErrKeyNotExist: the end
		}
	}
}

// liveSlotsOneByOne is liveSlots for kernels without batch operations.
func (d *Datapath) liveSlotsOneByOne(fn func(s *bpfPktmetaSlot)) error {
	for i := range d.SlotsMap.MaxEntries() {
		if err := d.visitSlot(i, fn); err != nil {
			return err
		}
	}
	return nil
}

// runTableOp runs pktmeta_table_write once and returns its TABLE_* result.
func (d *Datapath) runTableOp(op uint32, key *bpfPktmetaTuple, rec *bpfPktmetaRecord) (int32, error) {
	if d.TableWriter == nil {
		return 0, fmt.Errorf("program %s is not pinned (an interrupted upgrade: the next ADD or the agent completes it)", ProgTableWrite)
	}
	args := bpfPktmetaTableOp{Magic: tableOpMagic, Op: op, Key: *key, Rec: *rec}
	if err := runOnArgs(d.TableWriter, ProgTableWrite, &args); err != nil {
		return 0, err
	}
	if args.Magic != tableOpMagic {
		return 0, fmt.Errorf("%s did not run (results missing)", ProgTableWrite)
	}
	return args.Result, nil
}

// ErrTableFull: the table had no free slot for a record within reach of
// its tuple's home chunk.
var ErrTableFull = errors.New("connection table full")

// insertRecord puts rec under key into the table, through the datapath's
// own code (under its locks). It fails if key has a record. For tests and
// the bench: the datapath makes its records itself.
func (d *Datapath) insertRecord(key *bpfPktmetaTuple, rec *bpfPktmetaRecord) error {
	if err := d.writable(); err != nil {
		return err
	}
	res, err := d.runTableOp(tableOpInsert, key, rec)
	if err != nil {
		return err
	}
	switch res {
	case tableDone:
		return nil
	case tableExists:
		// A test run the kernel interrupted is run again whole: the
		// record may be the one this call put.
		var s bpfPktmetaSlot
		if d.findSlot(key, &s) == nil && s.Rec == *rec {
			return nil
		}
		return fmt.Errorf("insert %s: %w", tupleFromKey(key), ebpf.ErrKeyExist)
	case tableFull:
		return fmt.Errorf("insert %s: %w", tupleFromKey(key), ErrTableFull)
	}
	return fmt.Errorf("insert %s: table write result %d", tupleFromKey(key), res)
}

// removeRecord takes the record of connection connID under key out of the
// table, and nothing else (no alias, budget or event): what a test does
// behind the programs' back.
func (d *Datapath) removeRecord(key *bpfPktmetaTuple, connID uint64) error {
	if err := d.writable(); err != nil {
		return err
	}
	res, err := d.runTableOp(tableOpRemove, key, &bpfPktmetaRecord{ConnId: connID})
	if err != nil {
		return err
	}
	switch res {
	case tableDone:
		return nil
	case tableGone:
		return fmt.Errorf("remove %s: %w", tupleFromKey(key), ebpf.ErrKeyNotExist)
	}
	return fmt.Errorf("remove %s: table write result %d", tupleFromKey(key), res)
}

// InsertRecord puts a bare record of connection connID (no workload, no
// flags) under t: for the bench, which needs tables holding records. The
// datapath makes its records itself.
func (d *Datapath) InsertRecord(t Tuple, connID uint64) error {
	k := t.key()
	rec := bpfPktmetaRecord{Version: RecordVersion, ConnId: connID, ConnGen: uint32(connID)}
	return d.insertRecord(&k, &rec)
}
