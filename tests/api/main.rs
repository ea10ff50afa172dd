//! Haven's integration suite: the real binary, a fresh SQLite file per test,
//! real WebSocket clients.

mod admission;
mod api;
mod audit;
mod browser;
mod chat;
mod cli;
mod connections;
mod contract;
mod durability;
mod edges;
mod erasure;
mod hand_back;
mod hardening;
mod helpers;
mod instances;
mod metrics;
mod mock_llm;
mod openapi;
mod privacy;
mod providers;
mod safety;
mod visibility;
