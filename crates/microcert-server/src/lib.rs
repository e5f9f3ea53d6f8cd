//! microcert's network front ends: the device and relying-party resources
//! of PROTOCOL.md section 8 over CoAP (UDP) and HTTP, and the operator API.
//!
//! The front ends know no database and no card: they call a
//! [`api::DeviceService`], which the center implements.

pub mod api;
pub mod app;
pub mod coap;
pub mod coap_client;
pub mod http;
pub mod limits;
pub mod observe;
pub mod openapi;
pub mod operator;
pub mod run;
pub mod service;
pub mod shed;
pub mod tls;
pub mod tokens;
