/* glibc's allocator settings (mallopt), which Swift's Glibc module does not bring in, and the release of pages
   the dynamic loader read once at start. */
#include <elf.h>
#include <malloc.h>
#include <stddef.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <unistd.h>

/* Pages of the process's own mappings. */
struct cmalloc_pages { unsigned long start; unsigned long length; };

/* Lets go of the pages of the executable's relocation table, which the dynamic loader read through once at start
   and nothing reads again; returns the pages let go of (none when there is nothing to let go of). The pages stay
   in the page cache, and a read would fault them back in. Only whole pages inside a segment mapped read-only are
   let go of: never a page the process could have written. */
static inline struct cmalloc_pages cmalloc_release_relocations(void) {
    const struct cmalloc_pages none = { 0, 0 };
#if defined(__LP64__)
    const Elf64_Phdr *phdr = (const Elf64_Phdr *)getauxval(AT_PHDR);
    const size_t count = (size_t)getauxval(AT_PHNUM);
    if (phdr == NULL || count == 0)
        return none;
    Elf64_Addr base = 0;
    const Elf64_Dyn *dynamic = NULL;
    for (size_t i = 0; i < count; i++)
        if (phdr[i].p_type == PT_PHDR)
            base = (Elf64_Addr)phdr - phdr[i].p_vaddr;
    for (size_t i = 0; i < count; i++)
        if (phdr[i].p_type == PT_DYNAMIC)
            dynamic = (const Elf64_Dyn *)(base + phdr[i].p_vaddr);
    if (dynamic == NULL)
        return none;
    Elf64_Addr start = 0, length = 0;
    for (const Elf64_Dyn *d = dynamic; d->d_tag != DT_NULL; d++) {
        if (d->d_tag == DT_RELA) start = d->d_un.d_ptr;
        if (d->d_tag == DT_RELASZ) length = d->d_un.d_val;
    }
    /* glibc rebases the addresses of a writable dynamic section in place; a read-only one keeps them relative. */
    if (start != 0 && start < base)
        start += base;
    const Elf64_Addr page = (Elf64_Addr)sysconf(_SC_PAGESIZE);
    const Elf64_Addr first = (start + page - 1) & ~(page - 1), end = (start + length) & ~(page - 1);
    if (start == 0 || end <= first)
        return none;
    for (size_t i = 0; i < count; i++) {
        const Elf64_Phdr *p = &phdr[i];
        if (p->p_type == PT_LOAD && !(p->p_flags & PF_W) && base + p->p_vaddr <= first && end <= base + p->p_vaddr + p->p_filesz) {
            if (madvise((void *)first, end - first, MADV_DONTNEED) != 0)
                return none;
            const struct cmalloc_pages released = { first, end - first };
            return released;
        }
    }
#endif
    return none;
}
