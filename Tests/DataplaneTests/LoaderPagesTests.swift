import CMalloc
import Foundation
import Testing

@Suite("The relocation table the dynamic loader read at start is let go of")
struct LoaderPagesTests {
    /// Whether each page of `pages` is mapped in the process now (`/proc/self/pagemap`, bit 63).
    func present(_ pages: cmalloc_pages) throws -> [Bool] {
        let size = UInt(sysconf(Int32(_SC_PAGESIZE)))
        let map = try FileHandle(forReadingFrom: URL(fileURLWithPath: "/proc/self/pagemap"))
        defer { try? map.close() }
        try map.seek(toOffset: UInt64(pages.start / size * 8))
        let data = try map.read(upToCount: Int(pages.length / size) * 8) ?? Data()
        return stride(from: 0, to: data.count, by: 8).map { offset in
            data[data.startIndex + offset + 7] & 0x80 != 0
        }
    }

    @Test("this test process's relocations: whole pages, none of them mapped afterwards, and one read maps one back")
    func released() throws {
        let pages = cmalloc_release_relocations()
        // The test bundle is a position-independent executable like epokd: it has relative relocations.
        #expect(pages.length > 0 && pages.start % UInt(sysconf(Int32(_SC_PAGESIZE))) == 0)
        guard pages.length > 0 else { return }
        // The kernel maps the cached pages of a file around any page a thread reads, 64 KiB-aligned: the pages that
        // share such a block with other sections may come back as other tests run. Those of whole blocks may not.
        let block: UInt = 64 * 1024, size = UInt(sysconf(Int32(_SC_PAGESIZE)))
        let blocks = (pages.start + block - 1) / block * block..<(pages.start + pages.length) / block * block
        let mapped = try present(pages).enumerated().filter { $0.element && blocks.contains(pages.start + UInt($0.offset) * size) }
        #expect(!blocks.isEmpty && mapped.isEmpty, "\(mapped.count) pages of the relocation table are still mapped")
        // The pages are the file's: a read brings the first back, with what the file holds (a relocation entry's
        // bytes are not all zero).
        let first = UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: pages.start), count: Int(size))
        let read = first.reduce(0) { $0 | $1 }
        let back = try present(pages).first
        #expect(read != 0 && back == true)
    }
}
