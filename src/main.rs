/// jemalloc: the chat path allocates a little for every frame, and against
/// glibc's allocator it measured about a fifth more messages/s, with less
/// memory per idle socket (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    haven::run(haven::config_file::parse()).await
}
